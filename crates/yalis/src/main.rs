//! `yalis`: the batch-latency benchmark (no subcommand), `generate`, `plan` and `info`.

mod bench;
mod bench_allreduce;
mod common;
mod generate;
mod info;
mod launch;
mod plan;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "yalis",
    version,
    about = "A Llama inference engine for multi-GPU latency studies. With no subcommand: the batch-latency benchmark.",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    bench: bench::BenchArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate text for one or more prompts.
    Generate(generate::GenerateArgs),
    /// Print each rank's shards and memory, and whether it fits.
    Plan(plan::PlanArgs),
    /// Time and check the all-reduce backends (NCCL, NVRAR) over a sweep of message sizes.
    BenchAllreduce(bench_allreduce::AllReduceArgs),
    /// Print the version, build features, embedded kernels, and the GPUs and CUDA libraries found.
    Info,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("YALIS_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        None => bench::run(cli.bench),
        Some(Command::Generate(a)) => generate::run(a),
        Some(Command::Plan(a)) => plan::run(a),
        Some(Command::BenchAllreduce(a)) => bench_allreduce::run(a),
        Some(Command::Info) => info::run(),
    };
    if let Err(e) = result.and_then(|()| launch::finish()) {
        launch::exit_with(e);
    }
}
