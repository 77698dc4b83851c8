//! The engine on the CPU backend against HF transformers' greedy tokens and logits for small
//! random Llama checkpoints (tests/fixtures, made by scripts/make_fixtures.py), at every TP x PP
//! layout the fixtures allow.
//!
//! Tolerance: the reference is transformers in float32 on the CPU, over the same weights (bf16
//! values widened exactly to f32, or f32 as stored). Both sides compute in f32 and differ only in
//! summation order (blocked GEMM vs 8-lane dot products, TP partial sums added in a different
//! order). With K <= 200 terms per dot product, 2-3 layers and logits of magnitude ~10 (f32
//! epsilon 1.2e-7), that puts the difference near 1e-5; measured at every layout: at most
//! 6.7e-6 (run with --nocapture to see MAX_SEEN). 1e-4 absolute is 15x that, and still far
//! below what a real error gives (a bf16-rounded RoPE frequency already gave 2.7e-3; a wrong
//! pair, mask, scale or shard gives 0.1 to 10). Greedy tokens must match exactly: the fixtures'
//! smallest top-2 margin is 6.2e-3, 60x the tolerance.

use std::path::{Path, PathBuf};
use std::time::Duration;

use safetensors::SafeTensors;
use serde_json::Value;
use yalis_core::sampling::SamplingParams;
use yalis_core::weights::Checkpoint;
use yalis_core::{ParallelPlan, ResolvedModel};
use yalis_engine::ranks::run_threads;
use yalis_engine::{CpuBackend, Engine, GenerateOptions, Generation, Llama};

const TOL: f32 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

struct Reference {
    input_ids: Vec<Vec<u32>>,
    greedy: Vec<Vec<u32>>,
    logits: Vec<f32>,
    vocab: usize,
    steps: usize,
}

fn reference(dir: &Path) -> Reference {
    let j: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let ids = |k: &str| -> Vec<Vec<u32>> { serde_json::from_value(j[k].clone()).unwrap() };
    let bytes = std::fs::read(dir.join("reference.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("logits").unwrap();
    let shape = t.shape().to_vec();
    let logits = t
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    Reference {
        input_ids: ids("input_ids"),
        greedy: ids("greedy_ids"),
        logits,
        vocab: shape[2],
        steps: shape[1],
    }
}

fn generate(dir: &Path, prompts: &[Vec<u32>], tp: usize, pp: usize, steps: usize) -> Generation {
    generate_with(dir, prompts, tp, pp, steps, false)
}

fn generate_with(
    dir: &Path,
    prompts: &[Vec<u32>],
    tp: usize,
    pp: usize,
    steps: usize,
    replicated_head: bool,
) -> Generation {
    let opts = GenerateOptions {
        max_new_tokens: steps,
        sampling: SamplingParams::greedy(),
        ignore_eos: true,
        keep_logits: true,
    };
    run(dir, prompts, (tp, pp, 1), replicated_head, &opts, None)
}

/// Generation at TP x PP with `microbatches` for pipelined decode; the sampling rank's result.
fn run(
    dir: &Path,
    prompts: &[Vec<u32>],
    (tp, pp, microbatches): (usize, usize, usize),
    replicated_head: bool,
    opts: &GenerateOptions,
    eos: Option<&[u32]>,
) -> Generation {
    let mut model = ResolvedModel::resolve(dir.to_str().unwrap()).unwrap();
    if let Some(eos) = eos {
        model.config.eos_token_ids = eos.to_vec();
    }
    let mut plan = ParallelPlan::new(&model.config, tp, pp).unwrap();
    if replicated_head {
        plan = plan.with_replicated_lm_head(&model.config);
    }
    let ckpt = Checkpoint::open(dir).unwrap();
    let outs = run_threads(&plan, Duration::from_secs(120), |rp, comms| {
        let b = CpuBackend::new(comms.tp, comms.pp);
        let llama = Llama::load(&b, &model.config, rp, &ckpt, 64, &mut |_, _| {})?;
        let mut engine = Engine::new(b, llama, comms.world, prompts.len(), 64)?;
        engine.set_pp_microbatches(microbatches);
        engine.generate(prompts, opts)
    })
    .unwrap();
    // Every rank has the tokens; the sampling rank (last stage, TP rank 0) has the logits.
    for o in &outs {
        assert_eq!(o.tokens, outs[0].tokens);
    }
    outs.into_iter().nth((pp - 1) * tp).unwrap()
}

/// Every kept logit of `g` within TOL of `base`'s.
fn assert_logits_close(g: &Generation, base: &Generation, what: &str) {
    for (a, b) in g
        .logits
        .iter()
        .flatten()
        .flatten()
        .zip(base.logits.iter().flatten().flatten())
    {
        assert!((a - b).abs() <= TOL, "{what}: {a} vs {b}");
    }
}

fn check_fixture(name: &str, layouts: &[(usize, usize)]) {
    let dir = fixture(name);
    let r = reference(&dir);
    for &(tp, pp) in layouts {
        let g = generate(&dir, &r.input_ids, tp, pp, r.steps);
        assert_eq!(g.tokens, r.greedy, "{name} tp={tp} pp={pp}: greedy tokens differ");
        let mut max_err = 0f32;
        for (p, per_prompt) in g.logits.iter().enumerate() {
            assert_eq!(per_prompt.len(), r.steps);
            for (s, row) in per_prompt.iter().enumerate() {
                assert_eq!(row.len(), r.vocab);
                let off = (p * r.steps + s) * r.vocab;
                for (a, b) in row.iter().zip(&r.logits[off..off + r.vocab]) {
                    assert!(a.is_finite());
                    max_err = max_err.max((a - b).abs());
                }
            }
        }
        assert!(
            max_err <= TOL,
            "{name} tp={tp} pp={pp}: max |logit - reference| = {max_err} > {TOL}"
        );
        eprintln!("{name} tp={tp} pp={pp}: MAX_SEEN |logit - reference| = {max_err:.2e}");
    }
}

const LAYOUTS: &[(usize, usize)] = &[(1, 1), (2, 1), (4, 1), (1, 2), (2, 2), (4, 2)];

#[test]
fn gqa_llama3_bf16_sharded_matches_transformers() {
    check_fixture("gqa-llama3", LAYOUTS);
}

#[test]
fn tied_odd_f32_matches_transformers() {
    check_fixture("tied-odd", LAYOUTS);
}

#[test]
fn batch_composition_does_not_change_a_sequence() {
    // A prompt alone and the same prompt batched with others give the same tokens and logits.
    let dir = fixture("gqa-llama3");
    let r = reference(&dir);
    let alone = generate(&dir, &r.input_ids[1..2], 1, 1, r.steps);
    let batched = generate(&dir, &r.input_ids, 2, 1, r.steps);
    assert_eq!(alone.tokens[0], batched.tokens[1]);
    for (a, b) in alone.logits[0].iter().flatten().zip(batched.logits[1].iter().flatten()) {
        assert!((a - b).abs() <= TOL);
    }
}

#[test]
fn replicated_lm_head_gives_the_same_tokens_and_logits() {
    for name in ["gqa-llama3", "tied-odd"] {
        let dir = fixture(name);
        let r = reference(&dir);
        let base = generate(&dir, &r.input_ids, 1, 1, r.steps);
        for (tp, pp) in [(2, 1), (4, 2)] {
            let g = generate_with(&dir, &r.input_ids, tp, pp, r.steps, true);
            assert_eq!(g.tokens, r.greedy, "{name} tp={tp} pp={pp} replicated head");
            assert_logits_close(&g, &base, &format!("{name} tp={tp} pp={pp}"));
        }
    }
}

#[test]
fn pipelined_decode_gives_the_unpipelined_tokens_and_logits() {
    for name in ["gqa-llama3", "tied-odd"] {
        let dir = fixture(name);
        let r = reference(&dir);
        let base = generate(&dir, &r.input_ids, 1, 1, r.steps);
        let greedy = GenerateOptions {
            max_new_tokens: r.steps,
            sampling: SamplingParams::greedy(),
            ignore_eos: true,
            keep_logits: true,
        };
        // M below PP is raised to PP; M above the prompt count leaves micro-batches empty.
        for (tp, pp, m) in [(1, 2, 2), (1, 2, 3), (2, 2, 2), (1, 2, 1), (4, 2, 5)] {
            let g = run(&dir, &r.input_ids, (tp, pp, m), false, &greedy, None);
            assert_eq!(g.tokens, r.greedy, "{name} tp={tp} pp={pp} microbatches={m}");
            assert_logits_close(&g, &base, &format!("{name} tp={tp} pp={pp} m={m}"));
            assert_eq!(
                g.logits.iter().map(Vec::len).collect::<Vec<_>>(),
                vec![r.steps; r.input_ids.len()]
            );
        }
        // Sampled tokens, with sequences ending at eos at different steps: the same per sequence.
        // The eos ids are tokens the free-running generation draws at steps 3 and 7.
        let mut sampled = GenerateOptions {
            max_new_tokens: 16,
            sampling: SamplingParams {
                temperature: 1.5,
                seed: 7,
                ..SamplingParams::greedy()
            },
            ignore_eos: true,
            keep_logits: false,
        };
        let free = run(&dir, &r.input_ids, (1, 1, 1), false, &sampled, None);
        let eos = [free.tokens[0][3], free.tokens[1][7]];
        sampled.ignore_eos = false;
        let one = run(&dir, &r.input_ids, (1, 1, 1), false, &sampled, Some(&eos));
        let lens: Vec<usize> = one.tokens.iter().map(Vec::len).collect();
        assert!(
            lens.iter().any(|&l| l < 16) && lens.iter().min() != lens.iter().max(),
            "{lens:?}"
        );
        for m in [2, 3] {
            let g = run(&dir, &r.input_ids, (1, 2, m), false, &sampled, Some(&eos));
            assert_eq!(g.tokens, one.tokens, "{name}: sampled, microbatches={m}");
        }
    }
}
