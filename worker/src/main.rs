//! The `ionet` binary: parses arguments and hands them to the command.

use clap::Parser;
use ionet_worker::cli::{Cli, Command};
use ionet_worker::commands;

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Start(args) => commands::start(args),
        Command::Status(args) => commands::status(args),
        Command::Stop(args) => commands::stop(args),
    }
}
