//! `yalis bench-allreduce`: an nccl-tests-style sweep of the all-reduce backends on the same
//! buffers. Every rank is one GPU of the group; every size is first checked against a reference
//! sum computed on the host from every rank's (fresh, random) input, then timed, then checked again
//! (the timed calls are many back-to-back calls on the same buffers). Rank 0 prints one table per
//! backend, `size count type | time algbw busbw #wrong | vs nccl`, and appends JSONL records.

#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};

use crate::common::{ModelArgs, OnOff};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendName {
    Nccl,
    Nvrar,
}

impl BackendName {
    fn name(self) -> &'static str {
        match self {
            BackendName::Nccl => "nccl",
            BackendName::Nvrar => "nvrar",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DtypeArg {
    Bf16,
    F16,
    F32,
}

impl DtypeArg {
    fn bytes(self) -> usize {
        match self {
            DtypeArg::Bf16 | DtypeArg::F16 => 2,
            DtypeArg::F32 => 4,
        }
    }

    /// The relative rounding step of one rounding to this type (2^-(mantissa bits)).
    fn eps(self) -> f64 {
        match self {
            DtypeArg::Bf16 => 2f64.powi(-8),
            DtypeArg::F16 => 2f64.powi(-11),
            DtypeArg::F32 => 2f64.powi(-23),
        }
    }
}

#[derive(Args, Debug)]
pub struct AllReduceArgs {
    /// Launch, device and NVRAR options (--gpus-per-node, --nvrar-threads, --nvrar-blocks,
    /// --nvrar-put, --comm-timeout, --ranks, --rank ...); the model options are not used.
    #[command(flatten)]
    pub model: ModelArgs,
    /// GPUs in the all-reduce group (default: every GPU visible here).
    #[arg(long)]
    pub tp: Option<usize>,
    /// Backends to run on the same buffers; ratios are against nccl when it is among them.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "nccl,nvrar")]
    pub backends: Vec<BackendName>,
    /// Smallest message (bytes; K, M, G suffixes are powers of 1024).
    #[arg(long, default_value = "8K", value_parser = parse_size)]
    pub min_bytes: usize,
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    pub max_bytes: usize,
    /// Each size is the previous one times this.
    #[arg(long, default_value_t = 2)]
    pub step_factor: usize,
    /// An explicit list of message sizes in bytes, instead of --min-bytes/--max-bytes.
    #[arg(long, value_delimiter = ',', value_parser = parse_size)]
    pub sizes: Vec<usize>,
    /// Odd element counts checked for correctness (not timed) before the sweep.
    #[arg(long, value_delimiter = ',', default_value = "1,3,5,7,1001,4097,65537,1000003")]
    pub odd_counts: Vec<usize>,
    #[arg(long, value_enum, default_value_t = DtypeArg::Bf16)]
    pub dtype: DtypeArg,
    /// Calls per timed batch (captured into one CUDA graph with --graph on).
    #[arg(long, default_value_t = 50)]
    pub iters: usize,
    /// Timed batches (the median is reported), after one warm-up batch.
    #[arg(long, default_value_t = 10)]
    pub reps: usize,
    #[arg(long, value_enum, default_value_t = OnOff::On)]
    pub graph: OnOff,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Append one JSON record per (backend, size) to this file.
    #[arg(long)]
    pub output_json: Option<PathBuf>,
}

/// "8K" = 8192, "2M", "1G"; plain numbers are bytes.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let (num, mul) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 1 << 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 1 << 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    num.parse::<usize>()
        .map(|n| n * mul)
        .map_err(|_| format!("'{s}' is not a size (bytes, or a number with K, M or G)"))
}

/// The sweep's sizes in bytes.
fn sizes(a: &AllReduceArgs) -> Result<Vec<usize>> {
    let es = a.dtype.bytes();
    let sizes = if a.sizes.is_empty() {
        if a.min_bytes == 0 || a.max_bytes < a.min_bytes || a.step_factor < 2 {
            bail!(
                "--min-bytes {} --max-bytes {} --step-factor {}: need 0 < min <= max and a factor of at least 2",
                a.min_bytes,
                a.max_bytes,
                a.step_factor
            );
        }
        let mut v = vec![a.min_bytes];
        while let Some(next) = v.last().map(|&s| s * a.step_factor).filter(|&s| s <= a.max_bytes) {
            v.push(next);
        }
        v
    } else {
        a.sizes.clone()
    };
    if let Some(bad) = sizes.iter().find(|&&s| s == 0 || !s.is_multiple_of(es)) {
        bail!(
            "message size {bad} is not a positive multiple of the {es}-byte {:?} element",
            a.dtype
        );
    }
    Ok(sizes)
}

/// Rank `r`'s input for check `case`: uniform in [-1, 1), the same on every rank that computes it.
fn input_values(seed: u64, case: u64, r: usize, n: usize) -> Vec<f32> {
    let key = yalis_core::rng::stream_key(seed, 0xa11 + case * 1024 + r as u64);
    (0..n)
        .map(|i| 2.0 * yalis_core::rng::uniform(key, i as u64) - 1.0)
        .collect()
}

/// Values as `dt` bytes (rounded to nearest even) and back as they were stored.
fn encode(dt: DtypeArg, v: &[f32]) -> (Vec<u8>, Vec<f64>) {
    let mut bytes = Vec::with_capacity(v.len() * dt.bytes());
    let mut stored = Vec::with_capacity(v.len());
    for &x in v {
        match dt {
            DtypeArg::Bf16 => {
                let h = half::bf16::from_f32(x);
                bytes.extend_from_slice(&h.to_bits().to_le_bytes());
                stored.push(h.to_f64());
            }
            DtypeArg::F16 => {
                let h = half::f16::from_f32(x);
                bytes.extend_from_slice(&h.to_bits().to_le_bytes());
                stored.push(h.to_f64());
            }
            DtypeArg::F32 => {
                bytes.extend_from_slice(&x.to_le_bytes());
                stored.push(x as f64);
            }
        }
    }
    (bytes, stored)
}

fn decode(dt: DtypeArg, bytes: &[u8]) -> Vec<f64> {
    match dt {
        DtypeArg::Bf16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f64())
            .collect(),
        DtypeArg::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f64())
            .collect(),
        DtypeArg::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
            .collect(),
    }
}

/// The exact sum of every rank's stored inputs and, per element, the rounding bound: `ranks`
/// roundings to the element type (one per hop of a ring, at most) of partial sums no larger than
/// the sum of magnitudes. A dropped, doubled or stale contribution is far outside it.
struct Reference {
    sum: Vec<f64>,
    tol: Vec<f64>,
}

impl Reference {
    fn new(dt: DtypeArg, seed: u64, case: u64, ranks: usize, n: usize) -> (Reference, Vec<Vec<u8>>) {
        let mut sum = vec![0f64; n];
        let mut mag = vec![0f64; n];
        let mut inputs = Vec::with_capacity(ranks);
        for r in 0..ranks {
            let (bytes, stored) = encode(dt, &input_values(seed, case, r, n));
            for ((s, m), x) in sum.iter_mut().zip(&mut mag).zip(stored) {
                *s += x;
                *m += x.abs();
            }
            inputs.push(bytes);
        }
        let k = ranks as f64 * dt.eps();
        let tol = mag.iter().map(|m| k * m + f64::MIN_POSITIVE).collect();
        (Reference { sum, tol }, inputs)
    }

    /// (elements outside the bound, the largest error in units of the bound).
    fn check(&self, got: &[f64]) -> (usize, f64) {
        let mut wrong = 0;
        let mut worst = 0f64;
        for ((g, s), t) in got.iter().zip(&self.sum).zip(&self.tol) {
            let err = (g - s).abs() / t;
            if err.is_nan() || err > 1.0 {
                wrong += 1;
            }
            worst = if err.is_nan() { f64::INFINITY } else { worst.max(err) };
        }
        (wrong, worst)
    }
}

/// One rank's result for one (backend, size): time per call and the checks.
#[derive(Clone, Debug, Default)]
struct Outcome {
    us: f64,
    wrong: usize,
    worst: f64,
}

impl Outcome {
    fn to_bytes(&self) -> Vec<u8> {
        [self.us, self.wrong as f64, self.worst]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect()
    }

    fn from_bytes(b: &[u8]) -> Outcome {
        let f = |i: usize| f64::from_le_bytes(b[8 * i..8 * i + 8].try_into().expect("8 bytes"));
        Outcome {
            us: f(0),
            wrong: f(1) as usize,
            worst: f(2),
        }
    }

    /// Over ranks: the slowest time, every wrong element, the worst error.
    fn merge(all: &[Outcome]) -> Outcome {
        Outcome {
            us: all.iter().map(|o| o.us).fold(0.0, f64::max),
            wrong: all.iter().map(|o| o.wrong).sum(),
            worst: all.iter().map(|o| o.worst).fold(0.0, f64::max),
        }
    }
}

pub fn run(a: AllReduceArgs) -> Result<()> {
    let sizes = sizes(&a)?;
    if a.backends.is_empty() {
        bail!("--backends: name at least one of nccl, nvrar");
    }
    if a.iters == 0 || a.reps == 0 {
        bail!("--iters and --reps must be at least 1");
    }
    imp::run(a, sizes)
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use super::*;

    pub fn run(_: AllReduceArgs, _: Vec<usize>) -> Result<()> {
        bail!(
            "bench-allreduce runs on GPUs: this binary was built without the CUDA backend; rebuild with \
             `scripts/setup-cuda.sh && cargo build --release --features cuda`"
        )
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use anyhow::Context;
    use serde_json::json;
    use yalis_core::report::{append_jsonl, format_table};
    use yalis_core::ModelConfig;
    use yalis_cuda::backend::{Capacity, Collective, CudaBackend};
    use yalis_cuda::nvrar::ElemType;

    use super::*;
    use crate::common::{provenance, set_up_nvrar};
    use crate::launch::Launch;

    fn elem(dt: DtypeArg) -> ElemType {
        match dt {
            DtypeArg::Bf16 => ElemType::Bf16,
            DtypeArg::F16 => ElemType::F16,
            DtypeArg::F32 => ElemType::F32,
        }
    }

    fn collective(b: BackendName) -> Collective {
        match b {
            BackendName::Nccl => Collective::Nccl,
            BackendName::Nvrar => Collective::Nvrar,
        }
    }

    /// A model whose plan any TP degree divides: the launcher wants a plan, nothing is loaded.
    fn group_config(tp: usize) -> Result<ModelConfig> {
        let json = format!(
            r#"{{"hidden_size": {}, "intermediate_size": {}, "num_hidden_layers": 1, "num_attention_heads": {tp},
                "num_key_value_heads": {tp}, "vocab_size": {}}}"#,
            64 * tp,
            128 * tp,
            128 * tp
        );
        Ok(ModelConfig::from_json_str(&json, "all-reduce group")?)
    }

    pub fn run(a: AllReduceArgs, sizes: Vec<usize>) -> Result<()> {
        let visible = yalis_cuda::devices().len();
        let tp = match (a.tp, crate::launch::launched_world(&a.model)) {
            (Some(tp), _) => tp,
            (None, Some(world)) => world,
            (None, None) if visible > 0 => visible,
            (None, None) => bail!("bench-allreduce: no CUDA GPU is visible here"),
        };
        if tp < 2 {
            bail!("bench-allreduce needs a group of at least 2 GPUs (--tp), got {tp}");
        }
        let mut model_args = a.model.clone();
        if a.backends.contains(&BackendName::Nvrar) {
            model_args.allreduce = crate::common::AllReduce::Nvrar;
        } else {
            model_args.allreduce = crate::common::AllReduce::Nccl;
        }
        model_args.device = crate::common::Device::Cuda;
        let cfg = group_config(tp)?;
        let plan = model_args.plan(&cfg, tp, 1)?;
        let launch = Launch::new(&model_args, &[(tp, 1)])?;
        let mut rt = model_args.runtime(tp)?;
        launch.locate(&mut rt, &plan);
        let prints = launch.prints(tp);
        let dt = a.dtype;
        let es = dt.bytes();
        let max_bytes = sizes
            .iter()
            .copied()
            .chain(a.odd_counts.iter().map(|c| c * es))
            .max()
            .unwrap_or(es);
        if prints {
            println!(
                "yalis bench-allreduce ({}): {tp} GPUs, {} sum, backends {}, CUDA graphs {}, {} calls x {} reps per size",
                env!("YALIS_GIT_REV"),
                dt.to_possible_value().expect("no skipped variants").get_name(),
                a.backends.iter().map(|b| b.name()).collect::<Vec<_>>().join(", "),
                if a.graph == OnOff::On { "on" } else { "off" },
                a.iters,
                a.reps
            );
            for r in &plan.ranks {
                println!(
                    "  rank {} -> {} ({}) on {}",
                    r.rank, rt.devices[r.rank], rt.places[r.rank].0, rt.places[r.rank].1
                );
            }
        }
        let backends = a.backends.clone();
        let mut per_rank = launch.run(&plan, |rp, comms| {
            let ordinal = crate::launch::local_rank().unwrap_or(rp.rank);
            let cap = Capacity {
                max_tokens: 1,
                max_seqs: 1,
                arena_bytes: 1 << 20,
            };
            let mut b = CudaBackend::new(ordinal, cap, tp)?;
            let id = if comms.world.rank() == 0 {
                yalis_cuda::nccl::unique_id()?
            } else {
                Vec::new()
            };
            let id = comms.world.all_gather_bytes(&id)?.swap_remove(0);
            b.set_nccl(yalis_cuda::nccl::NcclGroups::new(&id, rp)?, 0);
            // NVRAR's buffer covers the largest message up to its 16 MiB launch limit.
            set_up_nvrar(&mut b, rp, comms.world.as_ref(), &rt, max_bytes.clamp(8, 16 << 20))?;
            let describe = b.nvrar().map(|n| n.describe());
            let input = b.raw_buffer(max_bytes)?;
            let output = b.raw_buffer(max_bytes)?;
            let world = comms.world.as_ref();
            let gather = |o: Outcome| -> yalis_engine::Result<Outcome> {
                let all = world.all_gather_bytes(&o.to_bytes())?;
                Ok(Outcome::merge(
                    &all.iter().map(|b| Outcome::from_bytes(b)).collect::<Vec<_>>(),
                ))
            };
            // Fresh inputs for check `case`, one call of `which`, the output against the reference.
            let check = |which: Collective, case: u64, n: usize| -> yalis_engine::Result<Outcome> {
                let (reference, inputs) = Reference::new(dt, a.seed, case, tp, n);
                b.upload_bytes(&input, &inputs[rp.rank])?;
                // Poison the output (all ones bits): a call that skips elements leaves NaNs.
                b.upload_bytes(&output, &vec![0xff; n * es])?;
                b.all_reduce_with(which, input.ptr(), output.ptr(), n, elem(dt))?;
                let got = decode(dt, &b.download_bytes(&output, n * es)?);
                let (wrong, worst) = reference.check(&got);
                Ok(Outcome { us: 0.0, wrong, worst })
            };
            let mut odd = Vec::new();
            for (bi, &be) in backends.iter().enumerate() {
                let mut sum = Outcome::default();
                for (ci, &n) in a.odd_counts.iter().enumerate() {
                    let o = check(collective(be), (1 << 20) + (bi * 100 + ci) as u64, n)?;
                    sum = Outcome {
                        us: 0.0,
                        wrong: sum.wrong + o.wrong,
                        worst: sum.worst.max(o.worst),
                    };
                }
                odd.push(gather(sum)?);
            }
            let mut rows = Vec::new();
            for (si, &bytes) in sizes.iter().enumerate() {
                let n = bytes / es;
                let mut row = Vec::new();
                for (bi, &be) in backends.iter().enumerate() {
                    let which = collective(be);
                    let case = (si * 16 + bi) as u64;
                    let before = check(which, case, n)?;
                    let us = b.time_calls_us(a.graph == OnOff::On, a.iters, a.reps, || {
                        b.all_reduce_with(which, input.ptr(), output.ptr(), n, elem(dt))
                    })?;
                    // After many back-to-back calls on the same buffers the output must still
                    // be the reference sum of the same inputs.
                    let (reference, _) = Reference::new(dt, a.seed, case, tp, n);
                    let got = decode(dt, &b.download_bytes(&output, n * es)?);
                    let (wrong, worst) = reference.check(&got);
                    let o = Outcome {
                        us,
                        wrong: before.wrong + wrong,
                        worst: before.worst.max(worst),
                    };
                    row.push(gather(o)?);
                }
                rows.push(row);
            }
            Ok((describe, odd, rows))
        })?;
        let Some((describe, odd, rows)) = per_rank.take(0) else {
            return Ok(());
        };
        report(&a, &sizes, tp, &rt, &plan, describe.as_deref(), &odd, &rows)
    }

    #[allow(clippy::too_many_arguments)]
    fn report(
        a: &AllReduceArgs,
        sizes: &[usize],
        tp: usize,
        rt: &crate::common::Runtime,
        plan: &yalis_core::ParallelPlan,
        nvrar: Option<&str>,
        odd: &[Outcome],
        rows: &[Vec<Outcome>],
    ) -> Result<()> {
        let dt = a.dtype;
        let type_name = dt
            .to_possible_value()
            .expect("no skipped variants")
            .get_name()
            .to_string();
        let nccl = a.backends.iter().position(|&b| b == BackendName::Nccl);
        let mut failed = Vec::new();
        for (bi, be) in a.backends.iter().enumerate() {
            let title = match (be, nvrar) {
                (BackendName::Nvrar, Some(d)) => d.to_string(),
                _ => be.name().to_string(),
            };
            println!(
                "\n== {title}\nodd element counts {:?}: {} wrong (worst error {:.3} of the rounding bound)",
                a.odd_counts, odd[bi].wrong, odd[bi].worst
            );
            if odd[bi].wrong > 0 {
                failed.push(format!("{} (odd counts)", be.name()));
            }
            let mut table = Vec::new();
            for (si, &bytes) in sizes.iter().enumerate() {
                let o = &rows[si][bi];
                let algbw = bytes as f64 / (o.us * 1e-6) / 1e9;
                let busbw = algbw * 2.0 * (tp - 1) as f64 / tp as f64;
                let ratio = nccl.map(|ni| rows[si][ni].us / o.us);
                table.push(vec![
                    fmt_size(bytes),
                    (bytes / dt.bytes()).to_string(),
                    type_name.clone(),
                    format!("{:.2}", o.us),
                    format!("{algbw:.2}"),
                    format!("{busbw:.2}"),
                    o.wrong.to_string(),
                    format!("{:.3}", o.worst),
                    ratio.map(|r| format!("{r:.2}x")).unwrap_or_else(|| "-".into()),
                ]);
                if o.wrong > 0 {
                    failed.push(format!("{} at {}", be.name(), fmt_size(bytes)));
                }
                if let Some(path) = &a.output_json {
                    let mut rec = provenance(plan, rt);
                    rec["kind"] = json!("all_reduce");
                    rec["config"] = json!({
                        "backend": be.name(), "backend_detail": title, "bytes": bytes, "count": bytes / dt.bytes(),
                        "dtype": type_name, "ranks": tp, "cuda_graph": a.graph == OnOff::On,
                        "calls_per_rep": a.iters, "reps": a.reps, "seed": a.seed,
                    });
                    rec["results"] = json!({
                        "us_per_call": o.us, "algbw_gbps": algbw, "busbw_gbps": busbw,
                        "wrong": o.wrong, "worst_error_over_bound": o.worst,
                        "speedup_vs_nccl": ratio, "odd_counts_wrong": odd[bi].wrong,
                    });
                    append_jsonl(path, &rec).with_context(|| format!("appending to {}", path.display()))?;
                }
            }
            print!(
                "{}",
                format_table(
                    &[
                        "size",
                        "count",
                        "type",
                        "time us",
                        "algbw GB/s",
                        "busbw GB/s",
                        "#wrong",
                        "err/bound",
                        "nccl/this"
                    ],
                    &table
                )
            );
        }
        if !failed.is_empty() {
            bail!("wrong sums: {}", failed.join(", "));
        }
        Ok(())
    }

    fn fmt_size(bytes: usize) -> String {
        match bytes {
            b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{}M", b >> 20),
            b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{}K", b >> 10),
            b => b.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("8K"), Ok(8192));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("100"), Ok(100));
        assert!(parse_size("1.5M").unwrap_err().contains("not a size"));
    }

    #[test]
    fn reference_catches_a_missing_contribution() {
        for dt in [DtypeArg::Bf16, DtypeArg::F16, DtypeArg::F32] {
            let (r, inputs) = Reference::new(dt, 1, 2, 4, 5000);
            // The sum rounded once: inside the bound everywhere.
            let rounded: Vec<f64> = decode(dt, &encode(dt, &r.sum.iter().map(|&x| x as f32).collect::<Vec<_>>()).0);
            assert_eq!(r.check(&rounded).0, 0, "{dt:?}");
            // Without rank 3's input: most elements are outside it.
            let partial: Vec<f64> = (0..4)
                .filter(|&k| k != 3)
                .map(|k| decode(dt, &inputs[k]))
                .fold(vec![0.0; 5000], |acc, v| {
                    acc.iter().zip(v).map(|(a, b)| a + b).collect()
                });
            let (wrong, _) = r.check(&partial);
            assert!(wrong > 4500, "{dt:?}: only {wrong} of 5000 flagged");
            // NaN poison is wrong.
            assert_eq!(r.check(&vec![f64::NAN; 5000]).0, 5000);
        }
    }
}
