//! The `ionet` binary: parses arguments and hands them to the command.

use clap::Parser;
use ionet_worker::cli::{Cli, Command, CreditsCommand, LedgerCommand};
use ionet_worker::{commands, metering_commands, quote_command};

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Start(args) => commands::start(args),
        Command::Status(args) => commands::status(args),
        Command::Stop(args) => commands::stop(args),
        Command::Usage(args) => metering_commands::usage(args),
        Command::Ledger(LedgerCommand::Balances(args)) => metering_commands::balances(args),
        Command::Settle(args) => metering_commands::settle(args),
        Command::Earnings(args) => metering_commands::earnings(args),
        Command::Credits(CreditsCommand::Add(args)) => metering_commands::credits_add(args),
        Command::Credits(CreditsCommand::Refund(args)) => metering_commands::credits_refund(args),
        Command::Quote(args) => quote_command::quote(args),
    }
}
