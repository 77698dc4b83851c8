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
use yalis_engine::{Backend, CpuBackend, Engine, GenerateOptions, Generation, Llama};

use crate::launch::RanksMode;

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
    /// On GPUs: NVRAR for messages up to the measured crossover with NCCL (16 MiB when the TP
    /// group is one node of NVRAR's hierarchy, 4 MiB across nodes of 2 or more GPUs, 256 KiB
    /// across nodes of 1), NCCL above, and NCCL alone where NVSHMEM is missing or ranks are
    /// threads; on the CPU, the host communicator.
    Auto,
}

/// `--allreduce auto` sends messages up to these sizes through NVRAR, larger ones through NCCL:
/// the crossovers measured on 4x H200 (benches/results/nvrar-2026-11-21/final): one node of 4,
/// NVRAR 1.04x at 16 MiB and 0.93x at 32 MiB; virtual nodes of 2, 1.09x at 4 MiB and 0.92x at
/// 8 MiB; virtual nodes of 1 (4 and 3 of them), 1.27x / 1.15x at 256 KiB and 1.19x / 0.91x at
/// 512 KiB. `--nvrar-auto-max-bytes` overrides them (re-measure on a real multi-node cluster).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub const AUTO_NVRAR_MAX_BYTES: [(&str, usize); 3] = [
    ("one node", 16 << 20),
    ("nodes of 2+ GPUs", 4 << 20),
    ("nodes of 1 GPU", 256 << 10),
];
const AUTO_DESCRIPTION: &str =
    "auto (nvrar up to 16 MiB in one node, 4 MiB across nodes of 2+ GPUs, 256 KiB across nodes of 1; nccl above)";

/// NVRAR's hierarchy and tunables (`--allreduce nvrar|auto` on GPUs).
#[derive(Args, Debug, Clone)]
pub struct NvrarOpts {
    /// GPUs per node of NVRAR's hierarchy (0: every GPU of the TP group is in one node). Smaller
    /// than the real node runs the inter-node phase between virtual nodes on one machine.
    #[arg(long, default_value_t = 0)]
    pub gpus_per_node: usize,
    /// NVRAR threads per block.
    #[arg(long, default_value_t = yalis_default_nvrar().0)]
    pub nvrar_threads: usize,
    /// The most blocks an NVRAR call uses (capped at the SM count).
    #[arg(long, default_value_t = yalis_default_nvrar().1)]
    pub nvrar_blocks: usize,
    /// With one node, NVRAR sends messages up to this many bytes one-shot (every GPU's whole
    /// input to every other) instead of reduce-scatter + all-gather; 0 turns it off. Default:
    /// measured, 4 MiB for 2 GPUs, 512 KiB for more.
    #[arg(long, value_parser = crate::bench_allreduce::parse_size)]
    pub nvrar_oneshot_bytes: Option<usize>,
    /// One-shot messages up to this many bytes travel as LL lines (data and flag in every 8
    /// bytes), larger ones as plain data with a flag per block.
    #[arg(long, default_value_t = yalis_default_nvrar().2, value_parser = crate::bench_allreduce::parse_size)]
    pub nvrar_ll_bytes: usize,
    /// `--allreduce auto`: the largest message NVRAR takes (default: the crossover measured for
    /// the hierarchy's shape; see AUTO_NVRAR_MAX_BYTES).
    #[arg(long, value_parser = crate::bench_allreduce::parse_size)]
    pub nvrar_auto_max_bytes: Option<usize>,
    /// Send to recursive-doubling partners through NVSHMEM puts even where NVLink reaches them
    /// (the other-node path, exercised on one machine).
    #[arg(long)]
    pub nvrar_put: bool,
    /// Bytes an NVRAR thread loads and stores at a time in the plain paths of one node (plain
    /// one-shot, reduce-scatter, all-gather): 8 or 16. LL lines and the inter-node phase always
    /// carry 8; across nodes 16 is ignored. 16 by measurement (benches/NOTES.md, NVRAR v4).
    #[arg(long, default_value_t = 16, value_parser = parse_pack_bytes)]
    pub nvrar_pack_bytes: usize,
    /// Start NVRAR's call counter (epoch) here instead of 0: a value near 4294967295 makes its
    /// 32-bit wrap-around happen within a short test run (scripts/gpu-nvrar-wrap.sh).
    #[arg(long, default_value_t = 0)]
    pub nvrar_start_epoch: u32,
}

fn parse_pack_bytes(s: &str) -> Result<usize, String> {
    match s.trim() {
        "8" => Ok(8),
        "16" => Ok(16),
        _ => Err(format!("'{s}' is not a pack size NVRAR has; use 8 or 16")),
    }
}

/// NVRAR's default (threads, max blocks): chosen by measurement (benches/NOTES.md, NVRAR).
const fn yalis_default_nvrar() -> (usize, usize, usize) {
    (512, 128, 64 << 10)
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
    /// The LM head: split by vocab rows with the logits gathered over TP (default), or
    /// replicated on every TP rank (more weight bytes per rank, no gather).
    #[arg(long, value_enum, default_value_t = LmHead::VocabParallel)]
    pub lm_head: LmHead,
    /// Capture each decode step as one CUDA graph per batch size and replay it.
    #[arg(long, value_enum, default_value_t = OnOff::On)]
    pub cuda_graphs: OnOff,
    /// With PP > 1: decode in this many micro-batches (at least PP) that flow through the stages
    /// one behind the other, so the stages work at once; 1 runs each step through the stages in
    /// turn.
    #[arg(long, default_value_t = 1)]
    pub pp_microbatches: usize,
    /// How the ranks run when no launcher (srun, mpirun, RANK/WORLD_SIZE) started this process:
    /// one child process per rank, or threads of this process.
    #[arg(long, value_enum, default_value_t = RanksMode::Processes)]
    pub ranks: RanksMode,
    /// This process's rank, for a job started by hand (with --world-size, --master-addr,
    /// --master-port); srun, mpirun and RANK/WORLD_SIZE say it otherwise.
    #[arg(long)]
    pub rank: Option<usize>,
    /// The job's number of processes (TP x PP), with --rank.
    #[arg(long)]
    pub world_size: Option<usize>,
    /// This process's rank on its node (default: LOCAL_RANK, else --rank).
    #[arg(long)]
    pub local_rank: Option<usize>,
    /// Rank 0's host for the rendezvous (default: MASTER_ADDR, or Slurm's first node).
    #[arg(long)]
    pub master_addr: Option<String>,
    /// Rank 0's rendezvous port (default: MASTER_PORT, or one derived from the Slurm job id).
    #[arg(long)]
    pub master_port: Option<u16>,
    #[command(flatten)]
    pub nvrar: NvrarOpts,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LmHead {
    VocabParallel,
    Replicated,
}

impl ModelArgs {
    /// The plan for `tp x pp` with the chosen LM head.
    pub fn plan(&self, cfg: &yalis_core::ModelConfig, tp: usize, pp: usize) -> Result<ParallelPlan> {
        let plan = ParallelPlan::new(cfg, tp, pp).with_context(|| format!("--tp {tp} --pp {pp}"))?;
        Ok(match self.lm_head {
            LmHead::VocabParallel => plan,
            LmHead::Replicated => plan.with_replicated_lm_head(cfg),
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

/// Visible CUDA GPUs: (name, bytes the planner may use). Empty without the cuda feature or a driver.
#[cfg(feature = "cuda")]
fn cuda_devices() -> Vec<(String, u64)> {
    // Leave 2 GiB of each GPU to the CUDA context, cuBLAS and the graphs.
    yalis_cuda::devices()
        .into_iter()
        .map(|d| {
            (
                format!("cuda:{} {} (pci {})", d.ordinal, d.name, d.pci),
                d.total_bytes.saturating_sub(2 << 30),
            )
        })
        .collect()
}

#[cfg(not(feature = "cuda"))]
fn cuda_devices() -> Vec<(String, u64)> {
    Vec::new()
}

/// The device and all-reduce a run will use, after `auto` is resolved.
pub struct Runtime {
    pub device: &'static str,
    pub allreduce: &'static str,
    /// Per-rank device names ("cuda:0 NVIDIA H200") for the banner and provenance.
    pub devices: Vec<String>,
    /// Free memory of the smallest device, for the planner's fit check.
    pub capacity: Option<u64>,
    pub cuda_graphs: bool,
    pub pp_microbatches: usize,
    /// Per rank: (process, host), e.g. ("thread 3", "nid001") or ("pid 1234", "nid002").
    pub places: Vec<(String, String)>,
    pub nvrar: NvrarOpts,
    pub timeout: Duration,
}

impl Runtime {
    #[cfg(feature = "cuda")]
    pub fn nvrar_config(&self, max_bytes: usize) -> yalis_cuda::nvrar::NvrarConfig {
        yalis_cuda::nvrar::NvrarConfig {
            gpus_per_node: self.nvrar.gpus_per_node,
            threads: self.nvrar.nvrar_threads,
            max_blocks: self.nvrar.nvrar_blocks,
            max_bytes,
            oneshot_max_bytes: self.nvrar.nvrar_oneshot_bytes,
            oneshot_ll_max_bytes: self.nvrar.nvrar_ll_bytes,
            force_put: self.nvrar.nvrar_put,
            wide_packs: self.nvrar.nvrar_pack_bytes == 16,
            timeout: self.timeout,
            start_epoch: self.nvrar.nvrar_start_epoch,
        }
    }
}

/// What a rank's engine offers the subcommands, whatever its backend.
pub trait RankEngine {
    fn generate(&mut self, prompts: &[Vec<u32>], opts: &GenerateOptions) -> yalis_engine::Result<Generation>;
    fn time_all_reduce(&self, elems: usize) -> yalis_engine::Result<Option<f64>>;
}

impl<B: Backend> RankEngine for Engine<B> {
    fn generate(&mut self, prompts: &[Vec<u32>], opts: &GenerateOptions) -> yalis_engine::Result<Generation> {
        Engine::generate(self, prompts, opts)
    }

    fn time_all_reduce(&self, elems: usize) -> yalis_engine::Result<Option<f64>> {
        Engine::time_all_reduce(self, elems)
    }
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

    /// Resolves `--device` and `--allreduce` for a job of `world` ranks on this node.
    pub fn runtime(&self, world: usize) -> Result<Runtime> {
        let gpus = cuda_devices();
        let device = match (self.device, gpus.is_empty()) {
            (Device::Cpu, _) | (Device::Auto, true) => "cpu",
            (Device::Cuda | Device::Auto, false) => "cuda",
            (Device::Cuda, true) if !cfg!(feature = "cuda") => bail!(
                "--device cuda: this binary was built without the CUDA backend; rebuild with `scripts/setup-cuda.sh && cargo build --release --features cuda`, or run with --device cpu"
            ),
            (Device::Cuda, true) => bail!("--device cuda: no CUDA GPU is visible here (libcuda missing, or CUDA_VISIBLE_DEVICES empty); run with --device cpu"),
        };
        if self.pp_microbatches == 0 {
            bail!("--pp-microbatches must be at least 1 (1: no pipelined decode)");
        }
        let allreduce = match (self.allreduce, device) {
            (AllReduce::Auto, "cpu") => "host (threads)",
            (a, "cpu") => bail!(
                "--allreduce {} needs --device cuda; on the CPU the ranks all-reduce through the host communicator (use --allreduce auto)",
                a.to_possible_value().expect("no skipped variants").get_name()
            ),
            (_, _) if world == 1 => "none (one rank)",
            (AllReduce::Nvrar, _) if self.ranks == RanksMode::Threads => bail!(
                "--allreduce nvrar: NVSHMEM has one PE per process, so ranks cannot be threads; drop --ranks threads"
            ),
            (AllReduce::Nvrar, _) => "nvrar",
            (AllReduce::Auto, _) if self.ranks == RanksMode::Threads => "nccl",
            (AllReduce::Auto, _) => AUTO_DESCRIPTION,
            (AllReduce::Nccl, _) => "nccl",
        };
        // Ranks as threads or self-started processes all sit on this node.
        if device == "cuda" && crate::launch::local_rank().is_none() && gpus.len() < world {
            bail!("{world} ranks need {world} GPUs on this node; {} visible", gpus.len());
        }
        let (devices, capacity) = match device {
            "cpu" => (vec!["cpu".to_string(); world], None),
            _ => (
                (0..world).map(|r| gpus[r % gpus.len()].0.clone()).collect(),
                gpus.iter().map(|g| g.1).min(),
            ),
        };
        Ok(Runtime {
            device,
            allreduce,
            devices,
            capacity,
            cuda_graphs: self.cuda_graphs == OnOff::On,
            pp_microbatches: self.pp_microbatches,
            places: (0..world)
                .map(|r| (format!("thread {r}"), yalis_comm::hostname()))
                .collect(),
            nvrar: self.nvrar.clone(),
            timeout: self.timeout(),
        })
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.comm_timeout.max(1))
    }
}

/// Builds one rank's engine on the runtime's device: backend, shards (with a progress bar on
/// rank 0) and KV cache for `max_batch` sequences of up to `max_seq` tokens.
pub fn build_engine(
    model: &ResolvedModel,
    rp: &RankPlan,
    comms: RankComms,
    src: &dyn WeightSource,
    rt: &Runtime,
    max_batch: usize,
    max_seq: usize,
) -> yalis_engine::Result<Box<dyn RankEngine>> {
    if rt.device == "cuda" {
        return build_cuda(model, rp, comms, src, rt, max_batch, max_seq);
    }
    let b = CpuBackend::new(comms.tp, comms.pp);
    Ok(Box::new(load(b, model, rp, comms.world, src, max_batch, max_seq, rt)?))
}

#[cfg(feature = "cuda")]
fn build_cuda(
    model: &ResolvedModel,
    rp: &RankPlan,
    comms: RankComms,
    src: &dyn WeightSource,
    rt: &Runtime,
    max_batch: usize,
    max_seq: usize,
) -> yalis_engine::Result<Box<dyn RankEngine>> {
    use yalis_cuda::backend::{arena_bytes, Capacity, CudaBackend};
    let max_tokens = max_batch * max_seq;
    let cap = Capacity {
        max_tokens,
        max_seqs: max_batch,
        arena_bytes: arena_bytes(&model.config, rp, max_tokens, max_batch),
    };
    // Threads of this process take GPU `rank`; a rank process takes its local rank's GPU
    // (CUDA_VISIBLE_DEVICES and one-GPU-per-task binding narrow what is visible).
    let ordinal = crate::launch::local_rank().unwrap_or(rp.rank);
    let visible = yalis_cuda::devices().len();
    if ordinal >= visible {
        return Err(yalis_engine::Error::Invalid(format!(
            "rank {} wants GPU {ordinal} of this node but {visible} are visible; start at most {visible} ranks per node",
            rp.rank
        )));
    }
    let mut b = CudaBackend::new(ordinal, cap, rp.tp)?;
    if rp.tp * rp.pp > 1 {
        // Rank 0 makes the NCCL id; every rank gets it over the host communicator.
        let id = if comms.world.rank() == 0 {
            yalis_cuda::nccl::unique_id()?
        } else {
            Vec::new()
        };
        let id = comms.world.all_gather_bytes(&id)?.swap_remove(0);
        b.set_nccl(yalis_cuda::nccl::NcclGroups::new(&id, rp)?, rp.pp_stage);
        // NVRAR's buffer takes a whole prefill message up to 16 MiB in one launch (longer
        // ones are cut into 16 MiB calls).
        let max_bytes = (max_tokens * model.config.hidden_size * 2).clamp(1 << 20, 16 << 20);
        set_up_nvrar(&mut b, rp, comms.world.as_ref(), rt, max_bytes)?;
    }
    Ok(Box::new(load(b, model, rp, comms.world, src, max_batch, max_seq, rt)?))
}

/// NVRAR for the TP all-reduce when the runtime asks for it: rank 0 makes the NVSHMEM unique id
/// (under `auto`, an empty id when NVSHMEM cannot be loaded there, and every rank stays on NCCL).
/// The TP group of this rank is the ranks of its stage, in TP order.
#[cfg(feature = "cuda")]
pub fn set_up_nvrar(
    b: &mut yalis_cuda::backend::CudaBackend,
    rp: &RankPlan,
    world: &dyn yalis_comm::HostComm,
    rt: &Runtime,
    max_bytes: usize,
) -> yalis_engine::Result<()> {
    use yalis_cuda::backend::AllReducePolicy;
    let mut policy = match rt.allreduce {
        // A TP group of one has no all-reduce: NVSHMEM is not started for PP alone.
        _ if rp.tp == 1 => return Ok(()),
        "nvrar" => AllReducePolicy::Nvrar,
        AUTO_DESCRIPTION => AllReducePolicy::Auto { nvrar_max_bytes: 0 },
        _ => return Ok(()),
    };
    let id = if world.rank() == 0 {
        match yalis_cuda::nvrar::unique_id() {
            Ok(id) => id.to_vec(),
            Err(e) if policy != AllReducePolicy::Nvrar => {
                eprintln!("yalis: warning: --allreduce auto uses NCCL alone: {e}");
                Vec::new()
            }
            Err(e) => return Err(e),
        }
    } else {
        Vec::new()
    };
    let id = world.all_gather_bytes(&id)?.swap_remove(0);
    let Ok(id) = <[u8; 128]>::try_from(id.as_slice()) else {
        return Ok(());
    };
    let group: Vec<usize> = (0..rp.tp).map(|t| rp.pp_stage * rp.tp + t).collect();
    let cfg = rt.nvrar_config(max_bytes);
    let ctx = b.context().clone();
    let nvrar = yalis_cuda::nvrar::Nvrar::new(&ctx, &id, rp.rank, world.size(), &group, cfg)?;
    if let AllReducePolicy::Auto { nvrar_max_bytes } = &mut policy {
        let l = nvrar.layout();
        let measured = match (l.nodes, l.g_size) {
            (1, _) => AUTO_NVRAR_MAX_BYTES[0].1,
            (_, 1) => AUTO_NVRAR_MAX_BYTES[2].1,
            _ => AUTO_NVRAR_MAX_BYTES[1].1,
        };
        *nvrar_max_bytes = rt.nvrar.nvrar_auto_max_bytes.unwrap_or(measured);
    }
    b.set_nvrar(nvrar, policy);
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn build_cuda(
    _: &ResolvedModel,
    _: &RankPlan,
    _: RankComms,
    _: &dyn WeightSource,
    _: &Runtime,
    _: usize,
    _: usize,
) -> yalis_engine::Result<Box<dyn RankEngine>> {
    Err(yalis_engine::Error::Invalid(
        "this binary was built without the cuda feature".into(),
    ))
}

#[allow(clippy::too_many_arguments)]
fn load<B: Backend + 'static>(
    b: B,
    model: &ResolvedModel,
    rp: &RankPlan,
    world: Box<dyn yalis_comm::HostComm>,
    src: &dyn WeightSource,
    max_batch: usize,
    max_seq: usize,
    rt: &Runtime,
) -> yalis_engine::Result<Engine<B>> {
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
    let mut engine = Engine::new(b, llama, world, max_batch, max_seq)?;
    engine.set_cuda_graphs(rt.cuda_graphs);
    engine.set_pp_microbatches(rt.pp_microbatches);
    Ok(engine)
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
            "  rank {:>3} -> {} ({}) on {}: stage {} layers {:>3}..{:<3} tp {} | weights {}, KV cache {} (bf16)\n",
            r.rank,
            rt.devices[r.rank],
            rt.places[r.rank].0,
            rt.places[r.rank].1,
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
        "features": features(),
        "versions": { "yalis": env!("CARGO_PKG_VERSION") },
        "host": yalis_comm::hostname(),
        "time": yalis_core::report::utc_now_rfc3339(),
        // The switches read from the environment (YALIS_PDL, NCCL_*, NVSHMEM_*).
        "env": std::env::vars()
            .filter(|(k, _)| ["YALIS_", "NCCL_", "NVSHMEM_"].iter().any(|p| k.starts_with(p)))
            .collect::<std::collections::BTreeMap<_, _>>(),
        "layout": {
            "tp": plan.tp,
            "pp": plan.pp,
            "world_size": plan.world_size(),
            "device": rt.device,
            "allreduce": rt.allreduce,
            "nvrar": json!({
                "gpus_per_node": rt.nvrar.gpus_per_node, "threads": rt.nvrar.nvrar_threads,
                "max_blocks": rt.nvrar.nvrar_blocks, "oneshot_bytes": rt.nvrar.nvrar_oneshot_bytes, "ll_bytes": rt.nvrar.nvrar_ll_bytes, "force_put": rt.nvrar.nvrar_put,
                "pack_bytes": rt.nvrar.nvrar_pack_bytes, "start_epoch": rt.nvrar.nvrar_start_epoch,
            }),
            "comm_timeout_s": rt.timeout.as_secs(),
            "pp_microbatches": rt.pp_microbatches,
            "ranks": plan.ranks.iter().map(|r| json!({
                "rank": r.rank, "pp_stage": r.pp_stage, "tp_rank": r.tp_rank,
                "layers": [r.layers.start, r.layers.end], "device": rt.devices[r.rank],
                "process": rt.places[r.rank].0, "host": rt.places[r.rank].1,
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

/// The device's two ceilings, measured in the run they are compared against.
pub struct Roofline {
    pub copy_gbps: f64,
    pub gemm_tflops: f64,
}

/// Measures the roofline on GPU 0 for CUDA runs (None on the CPU).
#[cfg(feature = "cuda")]
pub fn roofline(rt: &Runtime) -> Result<Option<Roofline>> {
    use yalis_cuda::backend::{Capacity, CudaBackend};
    if rt.device != "cuda" {
        return Ok(None);
    }
    let b = CudaBackend::new(
        0,
        Capacity {
            max_tokens: 1,
            max_seqs: 1,
            arena_bytes: 1 << 20,
        },
        1,
    )?;
    let (copy_gbps, gemm_tflops) = b.measure_roofline(4 << 30, 8192)?;
    Ok(Some(Roofline { copy_gbps, gemm_tflops }))
}

#[cfg(not(feature = "cuda"))]
pub fn roofline(_: &Runtime) -> Result<Option<Roofline>> {
    Ok(None)
}

/// The cargo features this binary was built with.
pub fn features() -> Vec<&'static str> {
    [("cuda", cfg!(feature = "cuda")), ("mpi", cfg!(feature = "mpi"))]
        .into_iter()
        .filter_map(|(name, on)| on.then_some(name))
        .collect()
}
