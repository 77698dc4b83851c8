//! What the subcommands share: the model, weight source, device and communicator choices, the
//! banner and provenance.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use yalis_comm::RankComms;
use yalis_core::plan::{fmt_bytes, MemoryParams};
use yalis_core::weights::{Checkpoint, DummyWeights, WeightSource};
use yalis_core::{ParallelPlan, RankPlan, ResolvedModel};
use yalis_engine::{CpuBackend, Engine, Llama};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Device {
    Cpu,
    Cuda,
    /// CUDA when this build has it and a GPU is present, else CPU.
    Auto,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AllReduce {
    Nccl,
    Nvrar,
    /// The fastest measured backend for each message size; on CPU, the host communicator.
    Auto,
}

/// Model, weights and runtime options shared by the benchmark and `generate`.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A preset (tiny, llama-3.1-8b, llama-3.1-70b, llama-3.1-405b; aliases llama-8b, llama-70b,
    /// llama-405b) or an HF checkpoint directory.
    #[arg(long, default_value = "tiny")]
    pub model: String,
    /// Deterministic random weights instead of the checkpoint's (always so for presets).
    #[arg(long)]
    pub dummy_weights: bool,
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    pub device: Device,
    /// The all-reduce of the row-parallel layers.
    #[arg(long, value_enum, default_value_t = AllReduce::Auto)]
    pub allreduce: AllReduce,
    /// Seconds any rank may wait on another before the job is declared hung and ended.
    #[arg(long, default_value_t = 600)]
    pub comm_timeout: u64,
}

/// The device and all-reduce a run will use, after `auto` is resolved.
pub struct Runtime {
    pub device: &'static str,
    pub allreduce: &'static str,
}

impl ModelArgs {
    pub fn resolve(&self) -> Result<ResolvedModel> {
        Ok(ResolvedModel::resolve(&self.model)?)
    }

    pub fn weight_source(&self, model: &ResolvedModel, seed: u64) -> Result<Box<dyn WeightSource>> {
        match &model.dir {
            Some(dir) if !self.dummy_weights => {
                Ok(Box::new(Checkpoint::open(dir).with_context(|| {
                    format!("opening the checkpoint in {}", dir.display())
                })?))
            }
            _ => Ok(Box::new(DummyWeights::new(seed))),
        }
    }

    pub fn runtime(&self) -> Result<Runtime> {
        let device = match self.device {
            Device::Cpu | Device::Auto => "cpu",
            Device::Cuda => {
                bail!("--device cuda: the CUDA backend is not part of this build yet; run with --device cpu (or auto)")
            }
        };
        let allreduce = match self.allreduce {
            AllReduce::Auto => "host (threads)",
            AllReduce::Nccl | AllReduce::Nvrar => bail!(
                "--allreduce {} needs --device cuda; on the CPU the ranks all-reduce through the host communicator (use --allreduce auto)",
                self.allreduce.to_possible_value().expect("no skipped variants").get_name()
            ),
        };
        Ok(Runtime { device, allreduce })
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.comm_timeout.max(1))
    }
}

/// Builds one rank's engine: backend, shards (with a progress bar on rank 0) and KV cache.
pub fn build_engine(
    model: &ResolvedModel,
    rp: &RankPlan,
    comms: RankComms,
    src: &dyn WeightSource,
    max_batch: usize,
    max_seq: usize,
) -> yalis_engine::Result<Engine<CpuBackend>> {
    let b = CpuBackend::new(comms.tp, comms.pp);
    let bar = (rp.rank == 0).then(|| {
        let bar = ProgressBar::new(1).with_style(
            ProgressStyle::with_template("loading weights [{bar:30}] {pos}/{len} {msg}").expect("a valid template"),
        );
        bar.set_message(src.describe());
        bar
    });
    let mut progress = |done: usize, total: usize| {
        if let Some(bar) = &bar {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        }
    };
    let llama = Llama::load(&b, &model.config, rp, src, max_seq, &mut progress)?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Engine::new(b, llama, comms.world, max_batch, max_seq)
}

/// Checks that sequences of `max_seq` tokens are within the model's positions.
pub fn check_seq_len(model: &ResolvedModel, max_seq: usize) -> Result<()> {
    let limit = model.config.max_position_embeddings;
    if max_seq > limit {
        bail!(
            "sequences of {max_seq} tokens exceed max_position_embeddings={limit} of {}",
            model.name
        );
    }
    Ok(())
}

/// The banner: model, layout, rank -> device, memory per rank.
pub fn banner(
    model: &ResolvedModel,
    plan: &ParallelPlan,
    rt: &Runtime,
    src: &dyn WeightSource,
    mem: MemoryParams,
) -> String {
    let c = &model.config;
    let mut s = format!(
        "yalis {} ({})\nmodel   {}: {} params, {} layers, hidden {}, {} heads / {} KV heads x {}, vocab {}\nweights {}\nlayout  TP {} x PP {} = {} ranks, device {}, all-reduce {}\n",
        env!("CARGO_PKG_VERSION"),
        env!("YALIS_GIT_REV"),
        model.name,
        fmt_count(c.num_params()),
        c.num_hidden_layers,
        c.hidden_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim,
        c.vocab_size,
        src.describe(),
        plan.tp,
        plan.pp,
        plan.world_size(),
        rt.device,
        rt.allreduce,
    );
    for r in &plan.ranks {
        let m = plan.memory(c, r.rank, mem);
        s += &format!(
            "  rank {:>3} -> {} thread {:>3} on {}: stage {} layers {:>3}..{:<3} tp {} | weights {}, KV cache {} (bf16)\n",
            r.rank,
            rt.device,
            r.rank,
            yalis_core::report::hostname(),
            r.pp_stage,
            r.layers.start,
            r.layers.end,
            r.tp_rank,
            fmt_bytes(m.weights),
            fmt_bytes(m.kv_cache),
        );
    }
    s
}

/// Provenance every JSONL record carries.
pub fn provenance(plan: &ParallelPlan, rt: &Runtime) -> Value {
    json!({
        "argv": std::env::args().collect::<Vec<_>>(),
        "git_rev": env!("YALIS_GIT_REV"),
        "features": if cfg!(feature = "cuda") { vec!["cuda"] } else { Vec::<&str>::new() },
        "versions": { "yalis": env!("CARGO_PKG_VERSION") },
        "host": yalis_core::report::hostname(),
        "time": yalis_core::report::utc_now_rfc3339(),
        "layout": {
            "tp": plan.tp,
            "pp": plan.pp,
            "world_size": plan.world_size(),
            "device": rt.device,
            "allreduce": rt.allreduce,
            "ranks": plan.ranks.iter().map(|r| json!({
                "rank": r.rank, "pp_stage": r.pp_stage, "tp_rank": r.tp_rank,
                "layers": [r.layers.start, r.layers.end], "device": rt.device,
                "host": yalis_core::report::hostname(),
            })).collect::<Vec<_>>(),
        },
    })
}

/// "8.03B", "3.67M".
pub fn fmt_count(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2}M", n as f64 / 1e6),
        n => n.to_string(),
    }
}
