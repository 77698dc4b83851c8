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
    /// NCCL on GPUs (per-size thresholds come with NVRAR); on the CPU, the host communicator.
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
    /// The LM head: split by vocab rows with the logits gathered over TP (default), or
    /// replicated on every TP rank (more weight bytes per rank, no gather).
    #[arg(long, value_enum, default_value_t = LmHead::VocabParallel)]
    pub lm_head: LmHead,
    /// Capture each decode step as one CUDA graph per batch size and replay it.
    #[arg(long, value_enum, default_value_t = OnOff::On)]
    pub cuda_graphs: OnOff,
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
                format!("cuda:{} {}", d.ordinal, d.name),
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
    /// Per rank: (process, host), e.g. ("thread 3", "nid001") or ("pid 1234", "nid002").
    pub places: Vec<(String, String)>,
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
        let allreduce = match (self.allreduce, device) {
            (AllReduce::Auto, "cpu") => "host (threads)",
            (a, "cpu") => bail!(
                "--allreduce {} needs --device cuda; on the CPU the ranks all-reduce through the host communicator (use --allreduce auto)",
                a.to_possible_value().expect("no skipped variants").get_name()
            ),
            (AllReduce::Nvrar, _) => bail!(
                "--allreduce nvrar: the NVRAR communicator is not in this build yet (use --allreduce nccl or auto)"
            ),
            (_, _) if world == 1 => "none (one rank)",
            (_, _) => "nccl",
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
            places: (0..world)
                .map(|r| (format!("thread {r}"), yalis_comm::hostname()))
                .collect(),
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
    Ok(Box::new(load(
        b,
        model,
        rp,
        comms.world,
        src,
        max_batch,
        max_seq,
        rt.cuda_graphs,
    )?))
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
    }
    Ok(Box::new(load(
        b,
        model,
        rp,
        comms.world,
        src,
        max_batch,
        max_seq,
        rt.cuda_graphs,
    )?))
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
    cuda_graphs: bool,
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
    engine.set_cuda_graphs(cuda_graphs);
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
        "layout": {
            "tp": plan.tp,
            "pp": plan.pp,
            "world_size": plan.world_size(),
            "device": rt.device,
            "allreduce": rt.allreduce,
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
