//! GPU correctness suite: every CUDA op against the CPU reference backend on fresh random inputs
//! with odd sizes (outputs poisoned with NaN first), GPU sampling against the CPU sampler, weight
//! loading (dummy generation on the GPU, bf16 straight from the map), and the whole engine on
//! the HF fixtures. Needs an sm_90 GPU: these tests are ignored by default and run on a GPU node
//! with `scripts/gpu-check.sh` (which runs this binary with `--ignored`).
//!
//! Tolerances: inputs are rounded to bf16 for both sides, so the CPU computes in f32 on the same
//! values; the GPU rounds each op's output to bf16 (relative 2^-9 = 2e-3 per element) and sums in
//! a different order. Single-op outputs: relative L2 error <= 4e-3 (two roundings); the
//! attention chain (rope, cache, softmax): 1e-2.

use std::path::{Path, PathBuf};
use std::time::Duration;

use yalis_comm::local_job;
use yalis_core::rng::{stream_key, Rng};
use yalis_core::sampling::{Sampler, SamplingParams};
use yalis_core::weights::{Checkpoint, DummyWeights, HostData, HostTensor, Slice, WeightSource};
use yalis_core::{ParallelPlan, ResolvedModel};
use yalis_cuda::backend::{arena_bytes, Capacity, CudaBackend, CudaTensor, DType};
use yalis_engine::backend::{Backend, QkvLayout, SeqChunk, StepBatch, StepInputs, WeightPiece};
use yalis_engine::cpu::{CpuBackend, CpuTensor};
use yalis_engine::ranks::run_threads;
use yalis_engine::{Engine, GenerateOptions, Llama};

fn gpu() -> CudaBackend {
    let cap = Capacity {
        max_tokens: 4096,
        max_seqs: 64,
        arena_bytes: 1 << 30,
    };
    CudaBackend::new(0, cap, 1).expect("a GPU")
}

fn cpu() -> CpuBackend {
    let mut c = local_job(1, 1, Duration::from_secs(10)).0;
    let c = c.remove(0);
    CpuBackend::new(c.tp, c.pp)
}

/// Random values of scale `scale`, rounded to bf16 (so both backends see the same inputs).
fn rand(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut r = Rng::new(seed, 1234);
    (0..n)
        .map(|_| half::bf16::from_f32((r.next_f32() * 2.0 - 1.0) * scale).to_f32())
        .collect()
}

fn both(g: &CudaBackend, rows: usize, cols: usize, data: &[f32]) -> (CudaTensor, CpuTensor) {
    (
        g.from_host(rows, cols, data, DType::Bf16).unwrap(),
        CpuTensor {
            rows,
            cols,
            data: data.to_vec(),
        },
    )
}

fn out_pair(g: &CudaBackend, c: &CpuBackend, rows: usize, cols: usize, dtype: DType) -> (CudaTensor, CpuTensor) {
    let t = match dtype {
        DType::Bf16 => g.alloc(rows, cols),
        DType::F32 => g.alloc_f32(rows, cols),
    }
    .unwrap();
    g.poison(&t).unwrap();
    (t, c.alloc(rows, cols).unwrap())
}

fn weight_pair(
    g: &CudaBackend,
    c: &CpuBackend,
    shape: &[usize],
    data: Vec<f32>,
) -> (yalis_cuda::backend::CudaWeight, yalis_engine::cpu::CpuWeight) {
    let t = HostTensor {
        shape: shape.to_vec(),
        data: HostData::F32(data),
    };
    (g.upload(&t).unwrap(), c.upload(&t).unwrap())
}

/// ‖a − b‖ / ‖b‖, after checking every element of `a` was written (no NaN left from the poison).
fn rel_err(g: &CudaBackend, a: &CudaTensor, b: &CpuTensor, what: &str) -> f64 {
    let a = g.to_host(a).unwrap();
    assert_eq!(a.len(), b.data.len(), "{what}: size");
    let bad = a.iter().filter(|x| !x.is_finite()).count();
    assert_eq!(bad, 0, "{what}: {bad} elements not written or not finite");
    let num: f64 = a.iter().zip(&b.data).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.data.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

fn assert_close(g: &CudaBackend, a: &CudaTensor, b: &CpuTensor, tol: f64, what: &str) {
    let e = rel_err(g, a, b, what);
    eprintln!("{what}: relative L2 error {e:.2e}");
    assert!(e <= tol, "{what}: relative L2 error {e:.3e} > {tol:.0e}");
}

fn step(g: &CudaBackend, c: &CpuBackend, batch: &StepBatch, ids: &[u32]) {
    let n = batch.seqs.len();
    let keys: Vec<u64> = (0..n as u64).map(|i| stream_key(5, i)).collect();
    let counters: Vec<u64> = (0..n as u64).map(|i| i * 3).collect();
    let inputs = StepInputs {
        batch,
        ids,
        sample_keys: &keys,
        sample_counters: &counters,
    };
    g.begin_step(&inputs).unwrap();
    c.begin_step(&inputs).unwrap();
}

#[test]
#[ignore = "needs an sm_90 GPU: scripts/gpu-check.sh"]
fn elementwise_ops_match_the_cpu() {
    let (g, c) = (gpu(), cpu());
    for (seed, (rows, h)) in [(1, 333), (7, 4096), (3, 72), (1, 5)].into_iter().enumerate() {
        let seed = seed as u64 * 10;
        let (x, xc) = both(&g, rows, h, &rand(rows * h, seed, 2.0));
        let (w, wc) = weight_pair(&g, &c, &[h], rand(h, seed + 1, 1.0).iter().map(|v| v + 1.0).collect());
        let (mut o, mut oc) = out_pair(&g, &c, rows, h, DType::Bf16);
        g.rms_norm(&x, &w, 1e-5, &mut o).unwrap();
        c.rms_norm(&xc, &wc, 1e-5, &mut oc).unwrap();
        assert_close(&g, &o, &oc, 4e-3, &format!("rms_norm [{rows}, {h}]"));

        let (mut r, mut rc) = both(&g, rows, h, &rand(rows * h, seed + 2, 1.0));
        let (d, dc) = both(&g, rows, h, &rand(rows * h, seed + 3, 1.0));
        let (mut o, mut oc) = out_pair(&g, &c, rows, h, DType::Bf16);
        g.add_rms_norm(&mut r, &d, &w, 1e-6, &mut o).unwrap();
        c.add_rms_norm(&mut rc, &dc, &wc, 1e-6, &mut oc).unwrap();
        assert_close(&g, &r, &rc, 4e-3, &format!("add_rms_norm residual [{rows}, {h}]"));
        assert_close(&g, &o, &oc, 4e-3, &format!("add_rms_norm out [{rows}, {h}]"));

        let (mut a, mut ac) = both(&g, rows, h, &rand(rows * h, seed + 4, 1.0));
        g.add(&mut a, &d).unwrap();
        c.add(&mut ac, &dc).unwrap();
        assert_close(&g, &a, &ac, 4e-3, &format!("add [{rows}, {h}]"));

        let i = h / 2 + 1;
        let (gu, guc) = both(&g, rows, 2 * i, &rand(rows * 2 * i, seed + 5, 3.0));
        let (mut o, mut oc) = out_pair(&g, &c, rows, i, DType::Bf16);
        g.silu_mul(&gu, &mut o).unwrap();
        c.silu_mul(&guc, &mut oc).unwrap();
        assert_close(&g, &o, &oc, 4e-3, &format!("silu_mul [{rows}, {i}]"));
    }
}

#[test]
#[ignore = "needs an sm_90 GPU: scripts/gpu-check.sh"]
fn matmul_matches_the_cpu_in_bf16_and_f32_out() {
    let (g, c) = (gpu(), cpu());
    // Up to 8 rows with K % 8 == 0 take the decode GEMV, the rest cuBLAS.
    let shapes = [
        (1, 4096, 1027),
        (5, 333, 77),
        (64, 1024, 4096),
        (300, 72, 200),
        (3, 17, 9),
        (8, 14336, 4096),
        (7, 1024, 333),
        (2, 72, 200),
        (9, 128, 64),
    ];
    for (m, k, n) in shapes {
        let (x, xc) = both(&g, m, k, &rand(m * k, (m * k) as u64, 1.0));
        let (w, wc) = weight_pair(&g, &c, &[n, k], rand(n * k, (n + k) as u64, 1.0 / (k as f32).sqrt()));
        for dtype in [DType::Bf16, DType::F32] {
            let (mut o, mut oc) = out_pair(&g, &c, m, n, dtype);
            g.matmul(&x, &w, &mut o).unwrap();
            c.matmul(&xc, &wc, &mut oc).unwrap();
            assert_close(
                &g,
                &o,
                &oc,
                4e-3,
                &format!("matmul [{m}, {k}] x [{n}, {k}]^T -> {dtype:?}"),
            );
        }
    }
}

#[test]
#[ignore = "needs an sm_90 GPU: scripts/gpu-check.sh"]
fn fused_silu_down_projection_matches_the_cpu() {
    let (g, c) = (gpu(), cpu());
    // (8, 1032, 4100) and (5, 14336, 4096) take the kernel's 32-rows-per-block path.
    for (m, i, n) in [
        (1, 14336, 4096),
        (5, 200, 72),
        (8, 1024, 333),
        (20, 512, 96),
        (8, 1032, 4100),
        (5, 14336, 4096),
    ] {
        let (gu, guc) = both(&g, m, 2 * i, &rand(m * 2 * i, (m + i) as u64, 3.0));
        let (w, wc) = weight_pair(&g, &c, &[n, i], rand(n * i, (n * i) as u64, 1.0 / (i as f32).sqrt()));
        let (mut o, mut oc) = out_pair(&g, &c, m, n, DType::Bf16);
        g.silu_mul_matmul(&gu, &w, &mut o).unwrap();
        c.silu_mul_matmul(&guc, &wc, &mut oc).unwrap();
        assert_close(
            &g,
            &o,
            &oc,
            4e-3,
            &format!("silu_mul_matmul [{m}, 2x{i}] x [{n}, {i}]^T"),
        );
    }
}

#[test]
#[ignore = "needs an sm_90 GPU: scripts/gpu-check.sh"]
fn embedding_and_row_gather_match_the_cpu() {
    let (g, c) = (gpu(), cpu());
    let (vocab, h, start) = (301, 97, 50);
    let (table, tc) = weight_pair(&g, &c, &[vocab, h], rand(vocab * h, 9, 1.0));
    let batch = StepBatch {
        seqs: vec![
            SeqChunk {
                slot: 0,
                start_pos: 0,
                len: 7,
            },
            SeqChunk {
                slot: 2,
                start_pos: 3,
                len: 4,
            },
        ],
    };
    let ids: Vec<u32> = vec![0, 49, 50, 51, 350, 351, 200, 999, 120, 77, 300];
    step(&g, &c, &batch, &ids);
    let (mut o, mut oc) = out_pair(&g, &c, ids.len(), h, DType::Bf16);
    g.embedding(&ids, &table, start, &mut o).unwrap();
    c.embedding(&ids, &tc, start, &mut oc).unwrap();
    assert_close(&g, &o, &oc, 1e-6, "embedding (ids inside and outside the shard)");
    let last = batch.last_rows();
    let (mut s, mut sc) = out_pair(&g, &c, last.len(), h, DType::Bf16);
    g.select_rows(&o, &last, &mut s).unwrap();
    c.select_rows(&oc, &last, &mut sc).unwrap();
    assert_close(&g, &s, &sc, 1e-6, "select_rows");
}

/// Prefill of several sequences of odd lengths, then decode steps, through rope, KV write and
/// attention on both backends, with GQA (and MHA) layouts and a head_dim that is not a power of
/// two.
#[test]
#[ignore = "needs an sm_90 GPU: scripts/gpu-check.sh"]
fn attention_prefill_and_decode_match_the_cpu() {
    let cases = [
        (8, 2, 128, 300),
        (4, 4, 18, 64),
        (16, 1, 64, 1100),
        (6, 3, 96, 40),
        (32, 8, 128, 200),
    ];
    for ((q_heads, kv_heads, head_dim, max_seq), mma) in cases.into_iter().flat_map(|c| [(c, true), (c, false)]) {
        let (g, c) = (gpu(), cpu());
        g.set_prefill_mma(mma);
        let l = QkvLayout {
            q_heads,
            kv_heads,
            head_dim,
        };
        let cfg = {
            let mut m = ResolvedModel::resolve("tiny").unwrap().config;
            m.head_dim = head_dim;
            m
        };
        let inv = cfg.rope_inv_freq();
        let table = |f: fn(f64) -> f64| HostTensor {
            shape: vec![max_seq, head_dim / 2],
            data: HostData::F32(
                (0..max_seq)
                    .flat_map(|p| inv.iter().map(move |w| f(p as f64 * w) as f32))
                    .collect(),
            ),
        };
        let (cos, sin) = (table(f64::cos), table(f64::sin));
        let (gcos, gsin) = (g.upload_table(&cos).unwrap(), g.upload_table(&sin).unwrap());
        let (ccos, csin) = (c.upload_table(&cos).unwrap(), c.upload_table(&sin).unwrap());
        let slots = 5;
        let mut gk = g.alloc_kv_cache(slots, max_seq, kv_heads, head_dim).unwrap();
        let mut ck = c.alloc_kv_cache(slots, max_seq, kv_heads, head_dim).unwrap();
        let lens = [max_seq - 10, 1, 13, max_seq / 3];
        let prefill = StepBatch {
            seqs: lens
                .iter()
                .enumerate()
                .map(|(i, &len)| SeqChunk {
                    slot: [4, 0, 2, 1][i],
                    start_pos: 0,
                    len,
                })
                .collect(),
        };
        let mut batches = vec![prefill];
        for d in 0..5 {
            batches.push(StepBatch {
                seqs: lens
                    .iter()
                    .enumerate()
                    .map(|(i, &len)| SeqChunk {
                        slot: [4, 0, 2, 1][i],
                        start_pos: len + d,
                        len: 1,
                    })
                    .collect(),
            });
        }
        for (si, batch) in batches.iter().enumerate() {
            let t = batch.num_tokens();
            step(&g, &c, batch, &vec![0; t]);
            let data = rand(t * l.width(), 100 + si as u64, 2.0);
            let (mut qkv, mut qkvc) = both(&g, t, l.width(), &data);
            // The fused rope + KV write on one pass, the two kernels on the other.
            if mma {
                g.rope_write_kv(&mut qkv, l, batch, &gcos, &gsin, &mut gk).unwrap();
            } else {
                g.rope(&mut qkv, l, batch, &gcos, &gsin).unwrap();
            }
            c.rope(&mut qkvc, l, batch, &ccos, &csin).unwrap();
            assert_close(&g, &qkv, &qkvc, 4e-3, &format!("rope {l:?} step {si} (fused: {mma})"));
            // Continue from identical bf16 values on both sides.
            let roped = g.to_host(&qkv).unwrap();
            qkvc.data = roped;
            if !mma {
                g.write_kv(&qkv, l, batch, &mut gk).unwrap();
            }
            c.write_kv(&qkvc, l, batch, &mut ck).unwrap();
            let (mut o, mut oc) = out_pair(&g, &c, t, q_heads * head_dim, DType::Bf16);
            g.attention(&qkv, l, batch, &gk, &mut o).unwrap();
            c.attention(&qkvc, l, batch, &ck, &mut oc).unwrap();
            let kind = match (si, mma) {
                (0, true) => "prefill (tensor cores where head_dim allows)",
                (0, false) => "prefill (warp per query)",
                _ => "decode",
            };
            assert_close(
                &g,
                &o,
                &oc,
                1e-2,
                &format!("attention {kind} {l:?} max_seq {max_seq} step {si}"),
            );
        }
    }
}

/// GPU sampling draws the same tokens as the CPU sampler from the same logits, keys and
/// counters: greedy, temperature, top-k, top-p and both.
#[test]
#[ignore = "needs an sm_90 GPU: scripts/gpu-check.sh"]
fn sampling_matches_the_cpu_sampler() {
    let (g, c) = (gpu(), cpu());
    for (vocab, width, rows) in [(128256, 128256, 4), (333, 336, 17), (1000, 1000, 64)] {
        let batch = StepBatch {
            seqs: (0..rows)
                .map(|i| SeqChunk {
                    slot: i,
                    start_pos: 0,
                    len: 1,
                })
                .collect(),
        };
        let mut logits = rand(rows * width, vocab as u64, 6.0);
        logits[3] = f32::NAN; // never chosen
        let lg = g.from_host(rows, width, &logits, DType::F32).unwrap();
        for (temperature, top_k, top_p) in [
            (0.0, 0, 1.0),
            (1.0, 0, 1.0),
            (0.7, 50, 1.0),
            (1.2, 0, 0.9),
            (0.8, 20, 0.95),
            (1.0, 1, 1.0),
        ] {
            let params = SamplingParams {
                temperature,
                top_k,
                top_p,
                seed: 11,
            };
            let mut mismatches = 0;
            for round in 0..8u64 {
                let keys: Vec<u64> = (0..rows as u64).map(|i| stream_key(params.seed, i)).collect();
                let counters: Vec<u64> = vec![round; rows];
                g.begin_step(&StepInputs {
                    batch: &batch,
                    ids: &[],
                    sample_keys: &keys,
                    sample_counters: &counters,
                })
                .unwrap();
                g.sample(&lg, vocab, &params).unwrap();
                let got = g.sampled_tokens(rows).unwrap();
                for r in 0..rows {
                    let row = &logits[r * width..r * width + vocab];
                    let want = Sampler::with_rng(params, Rng::at(keys[r], counters[r])).sample(row);
                    if got[r] != want {
                        mismatches += 1;
                        eprintln!(
                            "vocab {vocab} {params:?} row {r} round {round}: gpu {} cpu {want}",
                            got[r]
                        );
                    }
                }
            }
            // A draw that lands within f32 rounding of a CDF boundary may differ; anything more
            // is a bug.
            assert!(
                mismatches <= 1,
                "{mismatches} of {} draws differ for {params:?}",
                rows * 8
            );
        }
        let _ = &c;
    }
}

#[test]
#[ignore = "needs an sm_90 GPU: scripts/gpu-check.sh"]
fn weights_load_the_same_on_the_gpu() {
    let g = gpu();
    let dummy = DummyWeights::new(42);
    let host_of = |src: &dyn WeightSource, name: &str, shape: &[usize], slice: Slice| {
        src.load(name, shape, slice).unwrap().to_f32()
    };
    let cases: Vec<(&str, Vec<usize>, Slice)> = vec![
        (
            "model.layers.0.self_attn.q_proj.weight",
            vec![96, 72],
            Slice::Rows(24..72),
        ),
        (
            "model.layers.0.mlp.down_proj.weight",
            vec![72, 200],
            Slice::Cols(50..150),
        ),
        ("model.norm.weight", vec![72], Slice::Full),
        ("model.embed_tokens.weight", vec![333, 72], Slice::Rows(250..333)),
    ];
    for (name, shape, slice) in &cases {
        let w = g
            .load_weight(
                &dummy,
                &[WeightPiece {
                    name,
                    shape: shape.clone(),
                    slice: slice.clone(),
                }],
                None,
            )
            .unwrap();
        let got = g.weight_to_host(&w).unwrap();
        assert_eq!(
            got,
            host_of(&dummy, name, shape, slice.clone()),
            "dummy {name} {slice:?} generated on the GPU"
        );
    }
    // Straight from the memory map (bf16 rows), and through the host (f32 file, columns).
    let dir = fixtures().join("gqa-llama3");
    let ck = Checkpoint::open(&dir).unwrap();
    let name = "model.layers.1.mlp.up_proj.weight";
    assert!(ck
        .mapped_bf16(name, &[160, 64], &Slice::Rows(40..80))
        .unwrap()
        .is_some());
    let w = g
        .load_weight(
            &ck,
            &[WeightPiece {
                name,
                shape: vec![160, 64],
                slice: Slice::Rows(40..80),
            }],
            Some(48),
        )
        .unwrap();
    let mut want = host_of(&ck, name, &[160, 64], Slice::Rows(40..80));
    want.extend(std::iter::repeat_n(0.0, 8 * 64));
    assert_eq!(
        g.weight_to_host(&w).unwrap(),
        want,
        "mapped bf16 rows plus zero padding"
    );
    let ck2 = Checkpoint::open(&fixtures().join("tied-odd")).unwrap();
    let w = g
        .load_weight(
            &ck2,
            &[WeightPiece {
                name: "model.layers.0.mlp.down_proj.weight",
                shape: vec![72, 200],
                slice: Slice::Cols(50..100),
            }],
            None,
        )
        .unwrap();
    let want: Vec<f32> = host_of(
        &ck2,
        "model.layers.0.mlp.down_proj.weight",
        &[72, 200],
        Slice::Cols(50..100),
    )
    .iter()
    .map(|&x| half::bf16::from_f32(x).to_f32())
    .collect();
    assert_eq!(g.weight_to_host(&w).unwrap(), want, "f32 columns rounded to bf16");
}

fn fixtures() -> PathBuf {
    std::env::var_os("YALIS_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures"))
}

/// The bf16 engine on the HF fixtures. bf16 weights and activations with f32 accumulation
/// differ from transformers' float32 reference by up to a few percent of the logits' scale
/// (~10): LOGIT_TOL = 0.25 absolute. Greedy tokens must equal the reference's wherever its
/// top-2 margin exceeds 2 x LOGIT_TOL (a smaller margin may flip under bf16 rounding); once a
/// sequence departs, later steps are not compared.
const LOGIT_TOL: f32 = 0.25;

fn run_fixture(name: &str, cuda_graphs: bool) -> Vec<Vec<u32>> {
    let dir = fixtures().join(name);
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let prompts: Vec<Vec<u32>> = serde_json::from_value(r["input_ids"].clone()).unwrap();
    let greedy: Vec<Vec<u32>> = serde_json::from_value(r["greedy_ids"].clone()).unwrap();
    let margins: Vec<Vec<f32>> = serde_json::from_value(r["top2_margins"].clone()).unwrap();
    let bytes = std::fs::read(dir.join("reference.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("logits").unwrap();
    let (steps, vocab) = (t.shape()[1], t.shape()[2]);
    let reference: Vec<f32> = t
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();

    let model = ResolvedModel::resolve(dir.to_str().unwrap()).unwrap();
    let plan = ParallelPlan::new(&model.config, 1, 1).unwrap();
    let ck = Checkpoint::open(&dir).unwrap();
    let max_seq = 64;
    let opts = GenerateOptions {
        max_new_tokens: steps,
        sampling: SamplingParams::greedy(),
        ignore_eos: true,
        keep_logits: !cuda_graphs,
    };
    let out = run_threads(&plan, Duration::from_secs(120), |rp, comms| {
        let cap = Capacity {
            max_tokens: prompts.len() * max_seq,
            max_seqs: prompts.len(),
            arena_bytes: arena_bytes(&model.config, rp, prompts.len() * max_seq, prompts.len()),
        };
        let b = CudaBackend::new(0, cap, 1)?;
        let llama = Llama::load(&b, &model.config, rp, &ck, max_seq, &mut |_, _| {})?;
        let mut e = Engine::new(b, llama, comms.world, prompts.len(), max_seq)?;
        e.set_cuda_graphs(cuda_graphs);
        e.generate(&prompts, &opts)
    })
    .unwrap()
    .remove(0);
    let mut max_err = 0f32;
    let mut compared = 0;
    for p in 0..prompts.len() {
        for s in 0..steps {
            if !cuda_graphs {
                let row = &out.logits[p][s];
                let off = (p * steps + s) * vocab;
                for (a, b) in row.iter().zip(&reference[off..off + vocab]) {
                    max_err = max_err.max((a - b).abs());
                }
            }
            if out.tokens[p][s] != greedy[p][s] {
                assert!(
                    margins[p][s] <= 2.0 * LOGIT_TOL,
                    "{name} prompt {p} step {s}: token {} != reference {} with margin {}",
                    out.tokens[p][s],
                    greedy[p][s],
                    margins[p][s]
                );
                break;
            }
            compared += 1;
        }
    }
    eprintln!("{name} (graphs {cuda_graphs}): max |logit - reference| = {max_err:.3e}, {compared} tokens equal");
    assert!(
        max_err <= LOGIT_TOL,
        "{name}: max |logit - reference| = {max_err} > {LOGIT_TOL}"
    );
    out.tokens
}

#[test]
#[ignore = "needs an sm_90 GPU: scripts/gpu-check.sh"]
fn engine_matches_transformers_on_the_fixtures() {
    for name in ["gqa-llama3", "tied-odd"] {
        let eager = run_fixture(name, false);
        let graphed = run_fixture(name, true);
        assert_eq!(eager, graphed, "{name}: CUDA graphs change the tokens");
    }
}

/// The per-rank shapes of one Llama layer and LM head shard.
struct LayerShapes {
    name: &'static str,
    hidden: usize,
    inter: usize,
    vocab: usize,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

/// Not a check: one TP rank's decode ops of a Llama layer (and the LM head shard) at batch 1
/// and 8, each timed alone on random inputs (one call between two events, median of 50) and back
/// to back (20 calls in a row, per call: closer to what a CUDA graph with programmatic launch sees
/// of it), against the time its bytes take at the copy rate measured in the same run, to show
/// where a decode step goes. Printed as a table.
fn decode_op_breakdown(sh: &LayerShapes) {
    let g = gpu();
    let (copy_gbps, _) = g.measure_roofline(1 << 30, 4096).unwrap();
    let LayerShapes {
        hidden: h,
        inter,
        vocab,
        q_heads: q,
        kv_heads: kv,
        head_dim: hd,
        ..
    } = *sh;
    let dummy = DummyWeights::new(1);
    let w = |name: &str, rows: usize, cols: usize| {
        g.load_weight(
            &dummy,
            &[WeightPiece {
                name,
                shape: vec![rows, cols],
                slice: Slice::Full,
            }],
            None,
        )
        .unwrap()
    };
    let (qkv_rows, o_cols) = ((q + 2 * kv) * hd, q * hd);
    let wqkv = w("model.layers.0.self_attn.q_proj.weight", qkv_rows, h);
    let wo = w("model.layers.0.self_attn.o_proj.weight", h, o_cols);
    let wgu = w("model.layers.0.mlp.gate_proj.weight", 2 * inter, h);
    let wd = w("model.layers.0.mlp.down_proj.weight", h, inter);
    let wlm = w("lm_head.weight", vocab, h);
    let norm = w("model.norm.weight", 1, h);
    println!("{}: copy rate {copy_gbps:.0} GB/s", sh.name);
    println!(
        "{:>28} {:>6} {:>10} {:>12} {:>10} {:>9}",
        "op", "batch", "alone us", "in a row us", "copy us", "row/copy"
    );
    // YALIS_BREAKDOWN_BATCHES (default 1,8): the batch sizes; the GEMV rows only up to 8.
    let batches: Vec<usize> = std::env::var("YALIS_BREAKDOWN_BATCHES")
        .unwrap_or_else(|_| "1,8".into())
        .split(',')
        .map(|b| {
            b.trim()
                .parse()
                .expect("YALIS_BREAKDOWN_BATCHES: a list of batch sizes")
        })
        .collect();
    let runs = batches
        .iter()
        .flat_map(|&m| [(m, false), (m, true)])
        .filter(|&(m, gemv)| !gemv || m <= 8);
    for (m, gemv) in runs {
        g.set_gemv(gemv);
        println!("{}", if gemv { "decode GEMV" } else { "cuBLAS" });
        let x = g.from_host(m, h, &rand(m * h, 1, 1.0), DType::Bf16).unwrap();
        let xi = g.from_host(m, inter, &rand(m * inter, 2, 1.0), DType::Bf16).unwrap();
        let xq = g.from_host(m, o_cols, &rand(m * o_cols, 3, 1.0), DType::Bf16).unwrap();
        let gu = g
            .from_host(m, 2 * inter, &rand(m * 2 * inter, 4, 1.0), DType::Bf16)
            .unwrap();
        let row = |name: String, bytes: f64, f: &mut dyn FnMut() -> yalis_engine::Result<()>| {
            let alone = g.time_ms(5, 50, &mut *f).unwrap() * 1e3;
            const RUN: usize = 20;
            let in_row = g.time_ms(2, 10, || (0..RUN).try_for_each(|_| f())).unwrap() * 1e3 / RUN as f64;
            let copy = bytes / (copy_gbps * 1e9) * 1e6;
            println!(
                "{name:>28} {m:>6} {alone:>10.1} {in_row:>12.1} {copy:>10.1} {:>8.2}x",
                in_row / copy
            );
        };
        let mm = |rows: usize, cols: usize| (rows * cols * 2) as f64;
        let mut o_qkv = g.alloc(m, qkv_rows).unwrap();
        row(format!("qkv {qkv_rows}x{h}"), mm(qkv_rows, h), &mut || {
            g.matmul(&x, &wqkv, &mut o_qkv)
        });
        let mut o_h = g.alloc(m, h).unwrap();
        row(format!("o {h}x{o_cols}"), mm(h, o_cols), &mut || {
            g.matmul(&xq, &wo, &mut o_h)
        });
        let mut o_gu = g.alloc(m, 2 * inter).unwrap();
        row(format!("gate|up {}x{h}", 2 * inter), mm(2 * inter, h), &mut || {
            g.matmul(&x, &wgu, &mut o_gu)
        });
        row(format!("down {h}x{inter}"), mm(h, inter), &mut || {
            g.matmul(&xi, &wd, &mut o_h)
        });
        row(format!("silu_mul + down {h}x{inter}"), mm(h, inter), &mut || {
            g.silu_mul_matmul(&gu, &wd, &mut o_h)
        });
        let mut o_lm = g.alloc_f32(m, vocab).unwrap();
        row(format!("lm head {vocab}x{h}"), mm(vocab, h), &mut || {
            g.matmul(&x, &wlm, &mut o_lm)
        });
        let mut act = g.alloc(m, inter).unwrap();
        row("silu_mul".into(), (m * inter * 6) as f64, &mut || {
            g.silu_mul(&gu, &mut act)
        });
        let mut res = g.from_host(m, h, &rand(m * h, 5, 1.0), DType::Bf16).unwrap();
        let mut normed = g.alloc(m, h).unwrap();
        row("add_rms_norm".into(), (m * h * 8) as f64, &mut || {
            g.add_rms_norm(&mut res, &x, &norm, 1e-5, &mut normed)
        });
        // Decode attention of m sequences at position 1088 of a 1152-position cache (input
        // 1024, output 128, mid-way): RoPE + KV write, then split-KV attention and its combine;
        // the bytes are the K and V it reads. No matmul in it: timed once per batch size.
        if gemv {
            continue;
        }
        let (max_seq, pos) = (1152usize, 1088usize);
        let l = QkvLayout {
            q_heads: q,
            kv_heads: kv,
            head_dim: hd,
        };
        let mut cache = g.alloc_kv_cache(m, max_seq, kv, hd).unwrap();
        let batch = StepBatch {
            seqs: (0..m)
                .map(|i| SeqChunk {
                    slot: i,
                    start_pos: pos,
                    len: 1,
                })
                .collect(),
        };
        let keys = vec![0u64; m];
        g.begin_step(&StepInputs {
            batch: &batch,
            ids: &vec![0; m],
            sample_keys: &keys,
            sample_counters: &keys,
        })
        .unwrap();
        let table = |seed| HostTensor {
            shape: vec![max_seq, hd / 2],
            data: HostData::F32(rand(max_seq * hd / 2, seed, 1.0)),
        };
        let (cos, sin) = (g.upload_table(&table(6)).unwrap(), g.upload_table(&table(7)).unwrap());
        let mut qkv = g
            .from_host(m, l.width(), &rand(m * l.width(), 8, 1.0), DType::Bf16)
            .unwrap();
        let mut att = g.alloc(m, q * hd).unwrap();
        let kv_bytes = (m * (pos + 1) * kv * hd * 2 * 2) as f64;
        row("rope_write_kv".into(), (m * l.width() * 4) as f64, &mut || {
            g.rope_write_kv(&mut qkv, l, &batch, &cos, &sin, &mut cache)
        });
        row(format!("attention, context {}", pos + 1), kv_bytes, &mut || {
            g.attention(&qkv, l, &batch, &cache, &mut att)
        });
    }
}

#[test]
#[ignore = "needs an sm_90 GPU: scripts/gpu-check.sh"]
fn decode_op_breakdown_llama8b() {
    decode_op_breakdown(&LayerShapes {
        name: "Llama-3.1-8B, TP 1",
        hidden: 4096,
        inter: 14336,
        vocab: 128256,
        q_heads: 32,
        kv_heads: 8,
        head_dim: 128,
    });
}

/// One rank of Llama-3.1-70B at TP 4: the shards of benches/NOTES.md's 70B section.
#[test]
#[ignore = "needs an sm_90 GPU: scripts/gpu-check.sh"]
fn decode_op_breakdown_llama70b_tp4() {
    decode_op_breakdown(&LayerShapes {
        name: "Llama-3.1-70B, one rank of TP 4",
        hidden: 8192,
        inter: 28672 / 4,
        vocab: 128256 / 4,
        q_heads: 64 / 4,
        kv_heads: 8 / 4,
        head_dim: 128,
    });
}
