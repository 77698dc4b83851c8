//! The batch-latency benchmark, the main job: for every TP x PP layout and every (batch size,
//! input length, output length), prefill then decode on random prompts, timed per phase.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;
use yalis_core::perf::{decode_bytes, prefill_flops};
use yalis_core::plan::MemoryParams;
use yalis_core::report::{append_jsonl, format_table, Summary};
use yalis_core::rng::Rng;
use yalis_core::sampling::SamplingParams;
use yalis_core::ParallelPlan;
use yalis_engine::GenerateOptions;

use crate::common::{banner, build_engine, check_seq_len, provenance, ModelArgs};
use crate::launch::Launch;

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Tensor-parallel degrees (a comma list runs each).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub tp: Vec<usize>,
    /// Pipeline-parallel degrees (a comma list runs each).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub pp: Vec<usize>,
    #[arg(long, value_delimiter = ',', default_value = "8")]
    pub batch_size: Vec<usize>,
    /// Prompt tokens per sequence.
    #[arg(long, value_delimiter = ',', default_value = "32")]
    pub input_len: Vec<usize>,
    /// Generated tokens per sequence (the first comes from the prefill).
    #[arg(long, value_delimiter = ',', default_value = "128")]
    pub output_len: Vec<usize>,
    #[arg(long, default_value_t = 2)]
    pub num_iters_warmup: usize,
    #[arg(long, default_value_t = 10)]
    pub num_iters: usize,
    /// Seed of the dummy weights and the random prompts.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Append one JSON record per configuration to this file (never overwritten).
    #[arg(long)]
    pub output_json: Option<PathBuf>,
}

/// What the run measured besides the iterations: the device's ceilings and the all-reduce.
struct Measured<'a> {
    roofline: Option<&'a crate::common::Roofline>,
    /// Microseconds per TP all-reduce of the decode step's size (TP > 1 on GPUs).
    all_reduce_us: Option<f64>,
}

/// One timed iteration.
struct Iter {
    total: Duration,
    prefill: Duration,
    decode_steps: Vec<Duration>,
}

fn ms(d: &Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// `batch` prompts of `len` random ids, the same for every rank and run with this seed.
fn random_prompts(seed: u64, batch: usize, len: usize, vocab: usize) -> Vec<Vec<u32>> {
    (0..batch)
        .map(|i| {
            let mut rng = Rng::new(seed, 1000 + i as u64);
            (0..len).map(|_| (rng.next_u64() % vocab as u64) as u32).collect()
        })
        .collect()
}

fn check_args(a: &BenchArgs) -> Result<()> {
    for (flag, v) in [
        ("--tp", &a.tp),
        ("--pp", &a.pp),
        ("--batch-size", &a.batch_size),
        ("--input-len", &a.input_len),
        ("--output-len", &a.output_len),
    ] {
        if v.is_empty() || v.contains(&0) {
            bail!("{flag} takes positive integers (a comma list runs each), got {v:?}");
        }
    }
    if a.num_iters == 0 {
        bail!("--num-iters must be at least 1");
    }
    Ok(())
}

pub fn run(a: BenchArgs) -> Result<()> {
    check_args(&a)?;
    let model = a.model.resolve()?;
    a.model.runtime(1)?; // flag errors before any work
    let src = a.model.weight_source(&model, a.seed)?;
    let mut configs = Vec::new();
    for &b in &a.batch_size {
        for &i in &a.input_len {
            for &o in &a.output_len {
                configs.push((b, i, o));
            }
        }
    }
    let max_batch = *a.batch_size.iter().max().unwrap();
    let max_seq = configs.iter().map(|&(_, i, o)| i + o).max().unwrap();
    check_seq_len(&model, max_seq)?;
    let stage_layouts = |&pp: &usize| a.tp.iter().map(move |&tp| (tp, pp));
    let layouts: Vec<(usize, usize)> = a.pp.iter().flat_map(stage_layouts).collect();
    let launch = Launch::new(&a.model, &layouts)?;

    for &pp in &a.pp {
        for &tp in &a.tp {
            if !launch.runs(tp, pp) {
                continue;
            }
            let plan = a.model.plan(&model.config, tp, pp)?;
            let mut rt = a.model.runtime(plan.world_size())?;
            launch.locate(&mut rt, &plan);
            let prints = launch.prints(plan.world_size());
            let mem = MemoryParams {
                dtype_bytes: 2,
                batch_size: max_batch,
                max_seq_len: max_seq,
            };
            if let Some(cap) = rt.capacity {
                plan.check_fits(&model.config, mem, cap)?;
            }
            if prints {
                println!("{}", banner(&model, &plan, &rt, src.as_ref(), mem));
            }
            let roofline = if prints { crate::common::roofline(&rt)? } else { None };
            if let Some(r) = &roofline {
                println!(
                    "roofline (measured now on GPU 0, random data): device-to-device copy {:.0} GB/s (read + write), bf16 GEMM 8192^3 {:.0} TFLOP/s\n",
                    r.copy_gbps, r.gemm_tflops
                );
            }
            let mut per_rank = launch.run(&plan, |rp, comms| {
                let mut engine = build_engine(&model, rp, comms, src.as_ref(), &rt, max_batch, max_seq)?;
                let mut all = Vec::new();
                for &(b, i, o) in &configs {
                    let prompts = random_prompts(a.seed, b, i, model.config.vocab_size);
                    let opts = GenerateOptions {
                        max_new_tokens: o,
                        sampling: SamplingParams::greedy(),
                        ignore_eos: true,
                        keep_logits: false,
                    };
                    for _ in 0..a.num_iters_warmup {
                        engine.generate(&prompts, &opts)?;
                    }
                    let mut iters = Vec::with_capacity(a.num_iters);
                    for _ in 0..a.num_iters {
                        let t0 = Instant::now();
                        let g = engine.generate(&prompts, &opts)?;
                        iters.push(Iter {
                            total: t0.elapsed(),
                            prefill: g.prefill,
                            decode_steps: g.decode_steps,
                        });
                    }
                    // The decode step's all-reduce, timed alone on the same ranks: b rows of
                    // the hidden state.
                    let all_reduce_us = engine.time_all_reduce(b * model.config.hidden_size)?;
                    all.push((iters, all_reduce_us));
                }
                Ok(all)
            })?;
            // Ranks step in lockstep (every step ends with the token broadcast): rank 0 speaks,
            // from the process that ran it.
            if let Some(results) = per_rank.take(0) {
                for (&(b, i, o), (iters, all_reduce_us)) in configs.iter().zip(results) {
                    let m = Measured {
                        roofline: roofline.as_ref(),
                        all_reduce_us,
                    };
                    report(&a, &model, &plan, &rt, &m, (b, i, o), &iters)?;
                }
            }
        }
    }
    Ok(())
}

fn report(
    a: &BenchArgs,
    resolved: &yalis_core::ResolvedModel,
    plan: &ParallelPlan,
    rt: &crate::common::Runtime,
    measured: &Measured,
    (b, i, o): (usize, usize, usize),
    iters: &[Iter],
) -> Result<()> {
    let model = resolved.name.as_str();
    let roofline = measured.roofline;
    let latency: Vec<f64> = iters.iter().map(|it| ms(&it.total)).collect();
    let prefill = Summary::of(&iters.iter().map(|it| ms(&it.prefill)).collect::<Vec<_>>());
    let decode = Summary::of(
        &iters
            .iter()
            .flat_map(|it| it.decode_steps.iter().map(ms))
            .collect::<Vec<_>>(),
    );
    let lat = Summary::of(&latency);
    let out_tps = (b * o) as f64 / (lat.mean / 1e3);
    let total_tps = (b * (i + o)) as f64 / (lat.mean / 1e3);
    let f = |x: f64| format!("{x:.3}");
    let row = |name: &str, s: &Summary| {
        vec![
            name.to_string(),
            f(s.mean),
            f(s.std),
            f(s.p50),
            f(s.p90),
            f(s.p99),
            s.n.to_string(),
        ]
    };
    println!(
        "== {model}  TP {} x PP {}  batch {b}  input {i}  output {o}  ({} iterations after {} warm-up)",
        plan.tp, plan.pp, a.num_iters, a.num_iters_warmup
    );
    print!(
        "{}",
        format_table(
            &["", "mean", "std", "p50", "p90", "p99", "n"],
            &[
                row("prefill ms", &prefill),
                row("decode ms/step", &decode),
                row("batch latency ms", &lat)
            ]
        )
    );
    println!("throughput: {out_tps:.1} output tokens/s, {total_tps:.1} tokens/s with the prompt");
    // Rank 0's counts: what one step must read, what the prefill must compute.
    let rank0 = &plan.ranks[0];
    let step_bytes = decode_bytes(&resolved.config, rank0, b, i as f64 + o as f64 / 2.0, 2.0);
    let flops = prefill_flops(&resolved.config, rank0, b, i);
    let decode_gbps = step_bytes.total() / (decode.p50 * 1e-3) / 1e9;
    let prefill_tflops = flops / (prefill.p50 * 1e-3) / 1e12;
    let of = |x: f64, roof: Option<f64>| {
        roof.map(|r| format!(" = {:.1}% of {r:.0}", 100.0 * x / r))
            .unwrap_or_default()
    };
    println!(
        "decode reads {:.3} GB/step on rank 0 (weights {:.3}, KV {:.3}): {decode_gbps:.1} GB/s at the median step{}",
        step_bytes.total() / 1e9,
        step_bytes.weights / 1e9,
        step_bytes.kv_cache / 1e9,
        of(decode_gbps, roofline.map(|r| r.copy_gbps))
    );
    // Per decode step: two all-reduces per layer of the stage. The bound the step is held
    // against: weights over the measured copy rate, plus those all-reduces.
    let all_reduce = measured.all_reduce_us.map(|us| {
        let per_step_ms = 2.0 * rank0.layers.len() as f64 * us / 1e3;
        let bound_ms = roofline.map(|r| step_bytes.weights / (r.copy_gbps * 1e9) * 1e3 + per_step_ms);
        (us, per_step_ms, bound_ms)
    });
    if let Some((us, per_step_ms, bound_ms)) = all_reduce {
        println!(
            "all-reduce of {} KiB (in a CUDA graph): {us:.1} us, x {} per step = {per_step_ms:.3} ms = {:.1}% of the median step{}",
            b * resolved.config.hidden_size * 2 / 1024,
            2 * rank0.layers.len(),
            100.0 * per_step_ms / decode.p50,
            bound_ms
                .map(|bd| format!("; step / (weights at the copy rate + all-reduces) = {:.2}", decode.p50 / bd))
                .unwrap_or_default()
        );
    }
    println!(
        "prefill does {:.3} TFLOP on rank 0: {prefill_tflops:.2} TFLOP/s at the median{}\n",
        flops / 1e12,
        of(prefill_tflops, roofline.map(|r| r.gemm_tflops))
    );
    if let Some(path) = &a.output_json {
        let mut rec = provenance(plan, rt);
        rec["kind"] = json!("batch_latency");
        rec["model"] = json!(model);
        rec["config"] = json!({
            "batch_size": b, "input_len": i, "output_len": o,
            "num_iters": a.num_iters, "num_iters_warmup": a.num_iters_warmup, "seed": a.seed,
            "dummy_weights": a.model.dummy_weights || !std::path::Path::new(&a.model.model).is_dir(),
        });
        rec["results"] = json!({
            "prefill_ms": prefill, "decode_step_ms": decode, "batch_latency_ms": lat,
            "output_tokens_per_s": out_tps, "tokens_per_s": total_tps, "batch_latencies_ms": latency,
            "decode_bytes_per_step": step_bytes, "decode_gbps_p50": decode_gbps,
            "prefill_flops": flops, "prefill_tflops_p50": prefill_tflops,
            "roofline": roofline.map(|r| json!({"copy_gbps": r.copy_gbps, "gemm_tflops": r.gemm_tflops})),
            "all_reduce": all_reduce.map(|(us, per_step_ms, bound_ms)| json!({
                "us_per_call": us, "ms_per_step": per_step_ms, "share_of_step": per_step_ms / decode.p50,
                "bound_ms": bound_ms, "step_over_bound": bound_ms.map(|bd| decode.p50 / bd),
            })),
        });
        append_jsonl(path, &rec).with_context(|| format!("appending to {}", path.display()))?;
    }
    Ok(())
}
