//! `zhibo-loadtest`: the load generator (the chat client is `zhibo chat`).

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(version, about = "zhibo load generator and benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
