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
    /// Run a benchmark scenario and write its report (JSON + SVG) to the results folder.
    Bench(Box<zhibo_loadtest::bench::BenchArgs>),
    /// One generator process of the idle scenario (started by `bench idle --procs N`).
    #[command(hide = true)]
    IdleWorker(zhibo_loadtest::bench::idle::IdleWorkerArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cli.command {
            Command::Chat(args) => {
                let stdin = tokio::io::BufReader::new(tokio::io::stdin());
                zhibo_loadtest::chat::run(args, stdin, tokio::io::stdout()).await
            }
            Command::Bench(args) => {
                let report = zhibo_loadtest::bench::run_scenario(*args).await?;
                println!("{}", serde_json::to_string_pretty(&report.metrics)?);
                if !report.ratios.is_empty() {
                    println!("{}", serde_json::to_string_pretty(&report.ratios)?);
                }
                Ok(())
            }
            Command::IdleWorker(args) => zhibo_loadtest::bench::idle::idle_worker(args).await,
        }
    })
}
