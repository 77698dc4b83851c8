//! `yalis plan`: each rank's shards and memory, and whether it fits.

use anyhow::{Context, Result};
use clap::Args;
use yalis_core::plan::{fmt_bytes, parse_bytes, MemoryParams};
use yalis_core::{ParallelPlan, ResolvedModel};

#[derive(Args, Debug)]
pub struct PlanArgs {
    /// A preset or an HF checkpoint directory.
    #[arg(long, default_value = "tiny")]
    pub model: String,
    #[arg(long, default_value_t = 1)]
    pub tp: usize,
    #[arg(long, default_value_t = 1)]
    pub pp: usize,
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    /// Longest sequence (prompt + generated tokens) the KV cache must hold.
    #[arg(long, default_value_t = 2048)]
    pub max_seq_len: usize,
    /// Memory of one device, e.g. 141GB or 80GiB; with it the plan says whether each rank fits,
    /// and exits with status 1 when one does not.
    #[arg(long)]
    pub gpu_mem: Option<String>,
}

pub fn run(a: PlanArgs) -> Result<()> {
    let model = ResolvedModel::resolve(&a.model)?;
    let c = &model.config;
    let plan = ParallelPlan::new(c, a.tp, a.pp)?;
    let capacity = a.gpu_mem.as_deref().map(parse_bytes).transpose().context("--gpu-mem")?;
    let mem = MemoryParams {
        dtype_bytes: 2,
        batch_size: a.batch_size,
        max_seq_len: a.max_seq_len,
    };
    println!(
        "{}: {} params ({} in bf16), {} layers, {} heads / {} KV heads, intermediate {}, vocab {}",
        model.name,
        crate::common::fmt_count(c.num_params()),
        fmt_bytes(c.num_params() * 2),
        c.num_hidden_layers,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.intermediate_size,
        c.vocab_size
    );
    println!(
        "TP {} x PP {} = {} ranks; bf16 weights and KV cache; batch {}, sequences up to {} tokens{}\n",
        a.tp,
        a.pp,
        plan.world_size(),
        a.batch_size,
        a.max_seq_len,
        capacity
            .map(|c| format!("; {} per device", fmt_bytes(c)))
            .unwrap_or_default()
    );
    print!("{}", plan.describe(c, mem, capacity));
    if let Some(cap) = capacity {
        match plan.check_fits(c, mem, cap) {
            Ok(()) => println!("\nevery rank fits"),
            Err(e) => {
                println!("\n{e}");
                std::process::exit(1);
            }
        }
    }
    Ok(())
}
