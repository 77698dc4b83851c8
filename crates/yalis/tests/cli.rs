//! End to end: the real `yalis` binary, its printed tables and JSON records, and its tokens and
//! logits against HF transformers' (tests/fixtures, made by scripts/make_fixtures.py).
//!
//! Logit tolerance 1e-4 absolute, as in crates/yalis-engine/tests/hf_fixtures.rs: both sides
//! compute in f32 and differ only in summation order (measured at most 6.7e-6); a real error
//! gives 2.7e-3 or more. Greedy ids must match exactly (smallest top-2 margin 6.2e-3).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use safetensors::SafeTensors;
use serde_json::{json, Value};

const TOL: f32 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures")).join(name)
}

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn yalis<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Run {
    let Output { status, stdout, stderr } = Command::new(env!("CARGO_BIN_EXE_yalis"))
        .args(args)
        .env_remove("YALIS_LOG")
        .output()
        .expect("the yalis binary runs");
    Run {
        code: status.code(),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

fn ok<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Run {
    let r = yalis(args);
    assert_eq!(
        r.code,
        Some(0),
        "yalis failed\nstdout:\n{}\nstderr:\n{}",
        r.stdout,
        r.stderr
    );
    r
}

/// Runs a command that must fail; returns its stderr, which must contain every one of `needles`.
fn fails<S: AsRef<std::ffi::OsStr>>(args: &[S], needles: &[&str]) -> String {
    let r = yalis(args);
    assert!(
        matches!(r.code, Some(c) if c != 0),
        "expected a non-zero exit, got {:?}\nstdout:\n{}\nstderr:\n{}",
        r.code,
        r.stdout,
        r.stderr
    );
    for n in needles {
        assert!(r.stderr.contains(n), "stderr does not name {n:?}:\n{}", r.stderr);
    }
    r.stderr
}

fn s(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

fn read_jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect()
}

fn ids(v: &Value) -> Vec<u32> {
    serde_json::from_value(v.clone()).unwrap()
}

/// Tensor `logits` of a safetensors file: shape and f32 values.
fn read_logits(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("logits").unwrap();
    assert_eq!(t.dtype(), safetensors::Dtype::F32);
    let values = t
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    (t.shape().to_vec(), values)
}

struct Reference {
    prompts: Vec<String>,
    input_ids: Vec<Vec<u32>>,
    greedy: Vec<Vec<u32>>,
    decoded: Vec<String>,
    shape: Vec<usize>,
    logits: Vec<f32>,
}

fn reference(dir: &Path) -> Reference {
    let j: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let (shape, logits) = read_logits(&dir.join("reference.safetensors"));
    assert_eq!(j["max_new_tokens"], 8);
    Reference {
        prompts: serde_json::from_value(j["prompts"].clone()).unwrap(),
        input_ids: serde_json::from_value(j["input_ids"].clone()).unwrap(),
        greedy: serde_json::from_value(j["greedy_ids"].clone()).unwrap(),
        decoded: serde_json::from_value(j["decoded"].clone()).unwrap(),
        shape,
        logits,
    }
}

/// The eos ids of a checkpoint's config.json (one id or a list).
fn eos_ids(dir: &Path) -> BTreeSet<u32> {
    let c: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    match &c["eos_token_id"] {
        Value::Array(a) => a.iter().map(|v| v.as_u64().unwrap() as u32).collect(),
        v => [v.as_u64().unwrap() as u32].into(),
    }
}

/// A copy of a fixture in a fresh temporary directory.
fn copy_fixture(name: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(fixture(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), tmp.path().join(e.file_name())).unwrap();
    }
    tmp
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut Value)) {
    let path = dir.join("config.json");
    let mut c: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut c);
    std::fs::write(&path, serde_json::to_string_pretty(&c).unwrap()).unwrap();
}

/// `yalis generate` on the reference prompts; returns the JSON records (one per prompt, in
/// order), the logits file and stdout.
struct Generated {
    records: Vec<Value>,
    shape: Vec<usize>,
    logits: Vec<f32>,
    stdout: String,
}

fn generate(dir: &Path, prompts: &[String], extra: &[&str]) -> Generated {
    let tmp = tempfile::tempdir().unwrap();
    let (json, logits) = (tmp.path().join("gen.jsonl"), tmp.path().join("logits.safetensors"));
    let mut args: Vec<&str> = vec!["generate", "--model", s(dir)];
    for p in prompts {
        args.extend(["--prompt", p]);
    }
    args.extend(["--output-json", s(&json), "--logits-out", s(&logits)]);
    args.extend(extra);
    let r = ok(&args);
    let records = read_jsonl(&json);
    assert_eq!(records.len(), prompts.len());
    for (i, (rec, p)) in records.iter().zip(prompts).enumerate() {
        assert_eq!(rec["kind"], "generate");
        assert_eq!(rec["prompt_index"], i);
        assert_eq!(rec["prompt"], p.as_str());
    }
    let (shape, logits) = read_logits(&logits);
    Generated {
        records,
        shape,
        logits,
        stdout: r.stdout,
    }
}

fn generated_ids(g: &Generated) -> Vec<Vec<u32>> {
    g.records.iter().map(|r| ids(&r["generated_ids"])).collect()
}

/// Max |a - b| over row `(p, step)` of two [prompts, steps, vocab] tensors; every value of `a`
/// must be finite.
fn row_err(a: &[f32], b: &[f32], shape: &[usize], p: usize, step: usize) -> f32 {
    let v = shape[2];
    let off = (p * shape[1] + step) * v;
    a[off..off + v]
        .iter()
        .zip(&b[off..off + v])
        .map(|(x, y)| {
            assert!(x.is_finite(), "prompt {p} step {step}: logit {x}");
            (x - y).abs()
        })
        .fold(0.0, f32::max)
}

// ---- the batch-latency benchmark -------------------------------------------------------------

/// The numbers of a table row: mean, std, p50, p90, p99, n.
fn table_row(out: &str, name: &str) -> [f64; 6] {
    let line = out
        .lines()
        .find_map(|l| l.trim_start().strip_prefix(name))
        .unwrap_or_else(|| panic!("no row {name:?} in:\n{out}"));
    let v: Vec<f64> = line
        .split_whitespace()
        .map(|x| {
            x.parse()
                .unwrap_or_else(|_| panic!("row {name:?}: {x:?} is not a number"))
        })
        .collect();
    v.try_into()
        .unwrap_or_else(|v| panic!("row {name:?}: {v:?} is not 6 numbers"))
}

#[test]
fn default_run_prints_banner_and_latency_table() {
    let r = ok::<&str>(&[]);
    let out = &r.stdout;
    for needle in [
        "model   tiny: ",
        "weights dummy weights",
        "layout  TP 1 x PP 1 = 1 ranks, device cpu",
        "rank   0 -> cpu",
        "== tiny  TP 1 x PP 1  batch 8  input 32  output 128  (10 iterations after 2 warm-up)",
    ] {
        assert!(out.contains(needle), "no {needle:?} in:\n{out}");
    }
    let prefill = table_row(out, "prefill ms");
    let decode = table_row(out, "decode ms/step");
    let latency = table_row(out, "batch latency ms");
    assert_eq!(prefill[5], 10.0);
    assert_eq!(decode[5], 10.0 * 127.0, "every iteration decodes output_len - 1 steps");
    assert_eq!(latency[5], 10.0);
    for row in [prefill, decode, latency] {
        assert!(row[0] > 0.0 && row[1] >= 0.0, "{row:?}");
        assert!(
            row[2] <= row[3] && row[3] <= row[4],
            "percentiles out of order: {row:?}"
        );
    }
    assert!(
        latency[0] >= prefill[0] + 127.0 * decode[0] * 0.9,
        "a batch takes its prefill and its decode steps: {latency:?} {prefill:?} {decode:?}"
    );
    let tput = out
        .lines()
        .find_map(|l| l.strip_prefix("throughput: "))
        .unwrap_or_else(|| panic!("no throughput line in:\n{out}"));
    let out_tps: f64 = tput.split_whitespace().next().unwrap().parse().unwrap();
    assert!(tput.contains("output tokens/s"), "{tput}");
    let expected = 8.0 * 128.0 / (latency[0] / 1e3);
    assert!(
        (out_tps - expected).abs() <= 0.01 * expected,
        "throughput {out_tps} != batch 8 x 128 tokens / {} ms",
        latency[0]
    );
}

#[test]
fn comma_lists_run_the_cross_product_and_json_is_appended() {
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("bench.jsonl");
    let args = [
        "--batch-size",
        "1,2",
        "--input-len",
        "4",
        "--output-len",
        "3,5",
        "--tp",
        "1,2",
        "--num-iters",
        "2",
        "--num-iters-warmup",
        "1",
        "--output-json",
        s(&json),
    ];
    let mut expected_headers = Vec::new();
    for tp in [1, 2] {
        for b in [1, 2] {
            for o in [3, 5] {
                expected_headers.push(format!(
                    "== tiny  TP {tp} x PP 1  batch {b}  input 4  output {o}  (2 iterations after 1 warm-up)"
                ));
            }
        }
    }
    expected_headers.sort();

    let mut first_run = String::new();
    for run in 0..2 {
        let r = ok(&args);
        let mut headers: Vec<String> = r
            .stdout
            .lines()
            .filter(|l| l.starts_with("== tiny"))
            .map(String::from)
            .collect();
        headers.sort();
        assert_eq!(headers, expected_headers, "run {run}");
        assert_eq!(r.stdout.matches("prefill ms").count(), 8);
        assert_eq!(r.stdout.matches("layout  TP 2 x PP 1 = 2 ranks").count(), 1);
        if run == 0 {
            first_run = std::fs::read_to_string(&json).unwrap();
        }
    }
    let text = std::fs::read_to_string(&json).unwrap();
    assert!(
        text.starts_with(&first_run),
        "the second run rewrote the first one's records"
    );

    let records = read_jsonl(&json);
    assert_eq!(records.len(), 16);
    for half in records.chunks(8) {
        let seen: BTreeSet<(u64, u64, u64)> = half
            .iter()
            .map(|r| {
                let c = &r["config"];
                (
                    r["layout"]["tp"].as_u64().unwrap(),
                    c["batch_size"].as_u64().unwrap(),
                    c["output_len"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(seen.len(), 8, "each run records every configuration once: {seen:?}");
    }
    for r in &records {
        let argv: Vec<String> = serde_json::from_value(r["argv"].clone()).unwrap();
        assert_eq!(argv[1..], args, "argv");
        assert!(r["git_rev"].as_str().is_some_and(|g| !g.is_empty()));
        assert!(r["features"].is_array());
        assert_eq!(r["versions"]["yalis"], env!("CARGO_PKG_VERSION"));
        assert!(r["host"].as_str().is_some_and(|h| !h.is_empty()));
        let time = r["time"].as_str().unwrap();
        assert!(
            time.len() == 20 && time.as_bytes()[10] == b'T' && time.ends_with('Z'),
            "time {time}"
        );
        assert_eq!(r["kind"], "batch_latency");
        assert_eq!(r["model"], "tiny");

        let (tp, layout, c) = (r["layout"]["tp"].as_u64().unwrap(), &r["layout"], &r["config"]);
        assert_eq!(layout["pp"], 1);
        assert_eq!(layout["world_size"], tp);
        let ranks = layout["ranks"].as_array().unwrap();
        assert_eq!(ranks.len() as u64, tp);
        for (i, rank) in ranks.iter().enumerate() {
            assert_eq!(rank["rank"], i);
            assert_eq!(rank["tp_rank"], i);
            assert_eq!(rank["layers"], json!([0, 4]));
        }
        assert_eq!(c["input_len"], 4);
        assert_eq!(c["num_iters"], 2);
        let (b, o) = (c["batch_size"].as_u64().unwrap(), c["output_len"].as_u64().unwrap());

        let res = &r["results"];
        assert_eq!(res["decode_step_ms"]["n"], 2 * (o - 1), "num_iters * (output_len - 1)");
        assert_eq!(res["prefill_ms"]["n"], 2);
        assert_eq!(res["batch_latency_ms"]["n"], 2);
        assert_eq!(res["batch_latencies_ms"].as_array().unwrap().len(), 2);
        for key in ["prefill_ms", "decode_step_ms", "batch_latency_ms"] {
            let st = &res[key];
            let f = |k: &str| st[k].as_f64().unwrap_or_else(|| panic!("{key}.{k}: {st}"));
            assert!(f("min") > 0.0, "{key}: {st}");
            assert!(f("min") <= f("p50") && f("p50") <= f("p90") && f("p90") <= f("p99") && f("p99") <= f("max"));
            assert!(f("min") <= f("mean") && f("mean") <= f("max"), "{key}: {st}");
        }
        let mean = res["batch_latency_ms"]["mean"].as_f64().unwrap();
        let tps = res["output_tokens_per_s"].as_f64().unwrap();
        assert!((tps - (b * o) as f64 / (mean / 1e3)).abs() <= 1e-6 * tps, "{res}");
    }
}

// ---- generate against HF transformers -------------------------------------------------------

const LAYOUTS: [(usize, usize); 3] = [(1, 1), (2, 2), (4, 1)];

fn check_greedy_matches_reference(name: &str) {
    let dir = fixture(name);
    let r = reference(&dir);
    assert_eq!(r.shape[..2], [3, 8]);
    for (tp, pp) in LAYOUTS {
        let (tp_s, pp_s) = (tp.to_string(), pp.to_string());
        let extra = ["--max-new-tokens", "8", "--ignore-eos", "--tp", &tp_s, "--pp", &pp_s];
        let g = generate(&dir, &r.prompts, &extra);
        let at = format!("{name} tp={tp} pp={pp}");
        for (i, rec) in g.records.iter().enumerate() {
            assert_eq!(ids(&rec["input_ids"]), r.input_ids[i], "{at}: prompt {i} input ids");
            assert_eq!(rec["layout"]["tp"], tp);
            assert_eq!(rec["layout"]["pp"], pp);
            assert_eq!(rec["text"], r.decoded[i].as_str(), "{at}: prompt {i} text");
            let line = format!("[{i}] {}{}", r.prompts[i], r.decoded[i]);
            assert!(
                g.stdout.lines().any(|l| l == line),
                "{at}: no line {line:?} in:\n{}",
                g.stdout
            );
        }
        assert_eq!(generated_ids(&g), r.greedy, "{at}: greedy ids");
        assert_eq!(g.shape, r.shape, "{at}: logits shape");
        let mut max_err = 0f32;
        for p in 0..3 {
            for step in 0..8 {
                max_err = max_err.max(row_err(&g.logits, &r.logits, &r.shape, p, step));
            }
        }
        assert!(max_err <= TOL, "{at}: max |logit - reference| = {max_err} > {TOL}");
    }
}

#[test]
fn generate_gqa_llama3_matches_transformers() {
    check_greedy_matches_reference("gqa-llama3");
}

#[test]
fn generate_tied_odd_matches_transformers() {
    check_greedy_matches_reference("tied-odd");
}

/// Without --ignore-eos each sequence ends right after its first eos, the others go on, and the
/// logits after the end are NaN. The fixtures' greedy ids hold no eos, so a copy whose eos is
/// a token of prompt 0's greedy ids checks the cut too.
fn check_eos(name: &str, eos_at_step: usize) {
    let r = reference(&fixture(name));
    let copy = copy_fixture(name);
    let new_eos = r.greedy[0][eos_at_step];
    edit_config(copy.path(), |c| {
        c["eos_token_id"] = match &c["eos_token_id"] {
            Value::Array(a) => Value::Array(a.iter().cloned().chain([json!(new_eos)]).collect()),
            _ => json!(new_eos),
        }
    });
    for dir in [fixture(name), copy.path().to_path_buf()] {
        let eos = eos_ids(&dir);
        for (tp, pp) in [(1, 1), (2, 2)] {
            let (tp_s, pp_s) = (tp.to_string(), pp.to_string());
            let g = generate(
                &dir,
                &r.prompts,
                &["--max-new-tokens", "8", "--tp", &tp_s, "--pp", &pp_s],
            );
            let at = format!("{name} eos {eos:?} tp={tp} pp={pp}");
            let expected: Vec<Vec<u32>> = r
                .greedy
                .iter()
                .map(|g| match g.iter().position(|t| eos.contains(t)) {
                    Some(end) => g[..=end].to_vec(),
                    None => g.clone(),
                })
                .collect();
            assert_eq!(generated_ids(&g), expected, "{at}");
            assert_eq!(g.shape, r.shape, "{at}: logits shape");
            let v = r.shape[2];
            for (p, seq) in expected.iter().enumerate() {
                for step in 0..8 {
                    let off = (p * 8 + step) * v;
                    if step < seq.len() {
                        let err = row_err(&g.logits, &r.logits, &r.shape, p, step);
                        assert!(err <= TOL, "{at}: prompt {p} step {step}: |logit - reference| = {err}");
                    } else {
                        let row = &g.logits[off..off + v];
                        assert!(
                            row.iter().all(|x| x.is_nan()),
                            "{at}: prompt {p} step {step} is not NaN"
                        );
                    }
                }
            }
        }
    }
    assert!(
        r.greedy[0][..eos_at_step].iter().all(|t| *t != new_eos),
        "the test needs the eos first at step {eos_at_step}"
    );
}

#[test]
fn generate_gqa_llama3_stops_at_eos_list() {
    // 162 at steps 3, 4, 5 of prompt 0: the first one ends it.
    check_eos("gqa-llama3", 3);
}

#[test]
fn generate_tied_odd_stops_at_single_eos() {
    check_eos("tied-odd", 2);
}

#[test]
fn sampling_is_seeded_and_keeps_to_top_k() {
    let dir = fixture("tied-odd");
    let r = reference(&dir);
    let sampled = |seed: &str, layout: &[&str]| {
        let mut extra = vec![
            "--max-new-tokens",
            "16",
            "--ignore-eos",
            "--temperature",
            "0.8",
            "--top-k",
            "20",
            "--seed",
            seed,
        ];
        extra.extend(layout);
        generate(&dir, &r.prompts, &extra)
    };
    let a = sampled("7", &[]);
    let b = sampled("7", &[]);
    let c = sampled("8", &[]);
    let (a_ids, c_ids) = (generated_ids(&a), generated_ids(&c));
    assert_eq!(a_ids, generated_ids(&b), "the same seed gives the same ids");
    assert_ne!(a_ids, c_ids, "another seed gives other ids");
    assert!(a_ids.iter().all(|s| s.len() == 16));
    assert_eq!(a.records[0]["sampling"]["seed"], 7);
    assert_eq!(a.records[0]["sampling"]["top_k"], 20);
    assert!(
        a_ids.iter().zip(&r.greedy).any(|(s, g)| s[..8] != g[..]),
        "temperature 0.8 sampled the greedy ids for every prompt"
    );
    assert_eq!(a.shape, [3, 16, r.shape[2]]);
    for (g, ids) in [(&a, &a_ids), (&c, &c_ids)] {
        let v = g.shape[2];
        for (p, seq) in ids.iter().enumerate() {
            for (step, &t) in seq.iter().enumerate() {
                let row = &g.logits[(p * 16 + step) * v..][..v];
                let above = row.iter().filter(|&&x| x > row[t as usize]).count();
                assert!(
                    above < 20,
                    "prompt {p} step {step}: token {t} is not in the top 20 ({above} above)"
                );
            }
        }
    }
    // The draws use the gathered logits, which differ across layouts only by rounding.
    let split = sampled("7", &["--tp", "2", "--pp", "2"]);
    assert_eq!(generated_ids(&split), a_ids, "seed 7 at tp=2 pp=2");

    for extra in [
        &["--temperature", "0"][..],
        &["--temperature", "1", "--top-k", "1", "--seed", "3"],
        &["--temperature", "1", "--top-p", "0.0001", "--seed", "3"],
    ] {
        let mut args = vec!["--max-new-tokens", "8", "--ignore-eos"];
        args.extend(extra);
        let g = generate(&dir, &r.prompts, &args);
        assert_eq!(generated_ids(&g), r.greedy, "{extra:?} is greedy");
    }
}

// ---- plan -----------------------------------------------------------------------------------

/// Rows of the plan table: (rank, pp, tp, fits).
fn plan_rows(out: &str) -> Vec<(usize, usize, usize, String)> {
    out.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let n = |i: usize| f.get(i)?.parse::<usize>().ok();
            Some((n(0)?, n(1)?, n(2)?, f.last()?.to_string()))
        })
        .collect()
}

#[test]
fn plan_405b_fits_on_32_ranks() {
    let r = ok(&[
        "plan",
        "--model",
        "llama-405b",
        "--tp",
        "16",
        "--pp",
        "2",
        "--gpu-mem",
        "141GB",
    ]);
    assert!(r.stdout.contains("llama-3.1-405b"), "{}", r.stdout);
    assert!(r.stdout.contains("TP 16 x PP 2 = 32 ranks"), "{}", r.stdout);
    let rows = plan_rows(&r.stdout);
    assert_eq!(rows.len(), 32, "{}", r.stdout);
    for (i, (rank, pp, tp, fits)) in rows.iter().enumerate() {
        assert_eq!((*rank, *pp, *tp), (i, i / 16, i % 16));
        assert_eq!(fits, "yes");
    }
    assert!(r.stdout.trim_end().ends_with("every rank fits"), "{}", r.stdout);
}

#[test]
fn plan_405b_on_4_ranks_does_not_fit() {
    let r = yalis(&[
        "plan",
        "--model",
        "llama-405b",
        "--tp",
        "4",
        "--pp",
        "1",
        "--gpu-mem",
        "141GB",
    ]);
    assert_eq!(r.code, Some(1), "stdout:\n{}\nstderr:\n{}", r.stdout, r.stderr);
    let all = format!("{}{}", r.stdout, r.stderr);
    assert!(all.contains("does not fit: rank 0 needs"), "{all}");
    assert!(!all.contains("every rank fits"));
    let rows = plan_rows(&r.stdout);
    assert_eq!(rows.len(), 4);
    assert!(rows.iter().all(|row| row.3 == "NO"), "{rows:?}");
}

#[test]
fn plan_tp_must_divide_heads() {
    fails(
        &["plan", "--model", "llama-70b", "--tp", "3"],
        &["tp=3 does not divide num_attention_heads=64"],
    );
}

// ---- bad input ------------------------------------------------------------------------------

#[test]
fn unknown_model_lists_presets() {
    let presets = ["tiny", "llama-3.1-8b", "llama-3.1-70b", "llama-3.1-405b"];
    let mut needles = vec!["unknown model 'llama-9000'"];
    needles.extend(presets);
    fails(&["--model", "llama-9000"], &needles);
    fails(&["generate", "--model", "llama-9000", "--prompt", "hi"], &needles);
    fails(&["plan", "--model", "llama-9000"], &needles);
}

#[test]
fn malformed_config_names_config_json() {
    let copy = copy_fixture("tied-odd");
    let dir = s(copy.path());
    let config = copy.path().join("config.json");
    std::fs::write(&config, "{\"hidden_size\": 72,").unwrap();
    fails(&["generate", "--model", dir, "--prompt", "hi"], &[s(&config)]);
    fails(&["--model", dir, "--num-iters", "1"], &[s(&config)]);

    std::fs::copy(fixture("tied-odd").join("config.json"), &config).unwrap();
    edit_config(copy.path(), |c| c["hidden_act"] = json!("gelu"));
    fails(
        &["generate", "--model", dir, "--prompt", "hi"],
        &[s(&config), "hidden_act"],
    );
}

#[test]
fn missing_tensor_is_named() {
    let copy = copy_fixture("tied-odd");
    let file = copy.path().join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let missing = "model.layers.1.mlp.up_proj.weight";
    assert!(st.names().contains(&missing));
    let kept: Vec<_> = st.tensors().into_iter().filter(|(n, _)| n != missing).collect();
    safetensors::serialize_to_file(kept, None, &file).unwrap();
    let dir = s(copy.path());
    fails(
        &["generate", "--model", dir, "--prompt", "hi", "--max-new-tokens", "2"],
        &[missing],
    );
    // Layer 1 is on the second stage at pp=2.
    fails(&["generate", "--model", dir, "--prompt", "hi", "--pp", "2"], &[missing]);
    // The dummy weights do not read the checkpoint.
    ok(&[
        "generate",
        "--model",
        dir,
        "--prompt",
        "hi",
        "--max-new-tokens",
        "2",
        "--dummy-weights",
    ]);
}

#[test]
fn truncated_checkpoint_names_the_file() {
    let copy = copy_fixture("tied-odd");
    let file = copy.path().join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    for len in [bytes.len() / 2, 4] {
        std::fs::write(&file, &bytes[..len]).unwrap();
        let err = fails(
            &[
                "generate",
                "--model",
                s(copy.path()),
                "--prompt",
                "hi",
                "--max-new-tokens",
                "2",
            ],
            &[s(&file)],
        );
        assert!(err.contains("yalis: error:"), "{err}");
    }
}

#[test]
fn missing_tokenizer_falls_back_to_bytes() {
    let copy = copy_fixture("tied-odd");
    std::fs::remove_file(copy.path().join("tokenizer.json")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("gen.jsonl");
    let r = ok(&[
        "generate",
        "--model",
        s(copy.path()),
        "--prompt",
        "hi",
        "--max-new-tokens",
        "3",
        "--ignore-eos",
        "--output-json",
        s(&json),
    ]);
    assert!(
        r.stderr
            .contains("no tokenizer.json; using the built-in byte tokenizer"),
        "{}",
        r.stderr
    );
    let rec = &read_jsonl(&json)[0];
    // BOS (bos_token_id 0), then one id per byte (ids 0..3 are reserved for special tokens).
    assert_eq!(ids(&rec["input_ids"]), [0, b'h' as u32 + 3, b'i' as u32 + 3]);
    let out = ids(&rec["generated_ids"]);
    assert_eq!(out.len(), 3);
    assert!(out.iter().all(|&t| t < 333), "{out:?}");
}

#[test]
fn generate_tp_must_divide_heads() {
    let dir = fixture("gqa-llama3");
    fails(
        &["generate", "--model", s(&dir), "--prompt", "hi", "--tp", "3"],
        &["tp=3 does not divide num_attention_heads=4"],
    );
    fails(
        &["generate", "--model", s(&dir), "--prompt", "hi", "--pp", "4"],
        &["pp=4 exceeds num_hidden_layers=3"],
    );
}

#[test]
fn zero_sizes_are_refused() {
    fails(&["--batch-size", "0"], &["--batch-size"]);
    fails(&["--batch-size", "2,0"], &["--batch-size"]);
    fails(&["--output-len", "0"], &["--output-len"]);
    fails(&["--num-iters", "0"], &["--num-iters"]);
    let dir = fixture("tied-odd");
    fails(
        &[
            "generate",
            "--model",
            s(&dir),
            "--prompt",
            "hi",
            "--max-new-tokens",
            "0",
        ],
        &["--max-new-tokens"],
    );
}

#[test]
fn device_cuda_is_not_in_this_build() {
    // The tests build the binary without the cuda feature.
    fails(
        &["--device", "cuda"],
        &["--device cuda", "built without the CUDA backend", "--features cuda"],
    );
    let dir = fixture("tied-odd");
    fails(
        &["generate", "--model", s(&dir), "--prompt", "hi", "--device", "cuda"],
        &["built without the CUDA backend"],
    );
}

#[test]
fn allreduce_nccl_needs_cuda() {
    for device in ["cpu", "auto"] {
        let err = fails(
            &["--allreduce", "nccl", "--device", device],
            &["--allreduce", "--device cuda"],
        );
        assert!(err.to_lowercase().contains("nccl"), "{err}");
    }
}

#[test]
fn allreduce_nvrar_needs_cuda_and_processes() {
    let err = fails(
        &["--allreduce", "nvrar", "--device", "cpu"],
        &["--allreduce", "--device cuda"],
    );
    assert!(err.contains("nvrar"), "{err}");
    // The all-reduce benchmark runs on GPUs only; its flags are checked first.
    fails(
        &["bench-allreduce", "--tp", "2"],
        &["bench-allreduce", "--features cuda"],
    );
    fails(
        &["bench-allreduce", "--tp", "2", "--min-bytes", "1.5M"],
        &["'1.5M' is not a size"],
    );
    fails(
        &["bench-allreduce", "--tp", "2", "--sizes", "8K,3", "--dtype", "f32"],
        &["message size 3", "4-byte"],
    );
    fails(
        &[
            "bench-allreduce",
            "--tp",
            "2",
            "--min-bytes",
            "64K",
            "--max-bytes",
            "8K",
        ],
        &["--min-bytes", "need 0 < min <= max"],
    );
}

#[test]
fn sequences_longer_than_the_positions_are_refused() {
    fails(
        &["--input-len", "5000", "--output-len", "10"],
        &["5010", "max_position_embeddings=4096"],
    );
    // tied-odd has 128 positions: a 19-token prompt and 110 new tokens is one too many.
    let dir = fixture("tied-odd");
    let args = [
        "generate",
        "--model",
        s(&dir),
        "--prompt",
        "The quick brown fox",
        "--max-new-tokens",
    ];
    fails(&[&args[..], &["110"]].concat(), &["129", "max_position_embeddings=128"]);
}

#[test]
fn bad_sampling_flags_are_named() {
    let dir = fixture("tied-odd");
    let base = [
        "generate",
        "--model",
        s(&dir),
        "--prompt",
        "hi",
        "--max-new-tokens",
        "2",
    ];
    for bad in [
        &["--temperature", "-1"][..],
        &["--temperature=-1"],
        &["--temperature", "nan"],
    ] {
        fails(&[&base[..], bad].concat(), &["--temperature"]);
    }
    for bad in [&["--top-p", "0"][..], &["--top-p", "1.5"]] {
        fails(&[&base[..], bad].concat(), &["--top-p"]);
    }
}
