use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = treasury::cli::Cli::parse();
    let quiet = matches!(
        cli.command,
        treasury::cli::Command::Demo(_) | treasury::cli::Command::Simulate(_)
    );
    treasury::telemetry::init_logging(if quiet { "error" } else { "info" });
    match treasury::cli::run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
