//! The `ionet` binary: parses arguments and hands them to the command.

use clap::Parser;

fn main() -> anyhow::Result<()> {
    ionet_worker::cli::run(ionet_worker::cli::Cli::parse())
}
