//! `zhibo-loadtest`: the command-line chat client and the load generator.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(version, about = "zhibo command-line client and load generator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Chat in the terminal: sign up/in, connect, print what was missed, send lines.
    Chat(zhibo_loadtest::chat::ChatArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Chat(args) => {
            let stdin = tokio::io::BufReader::new(tokio::io::stdin());
            zhibo_loadtest::chat::run(args, stdin, tokio::io::stdout()).await
        }
    }
}
