//! `yalis generate`: text in, text out, with the ids and logits on request.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;
use yalis_core::plan::MemoryParams;
use yalis_core::report::append_jsonl;
use yalis_core::sampling::SamplingParams;
use yalis_core::tokenizer::TextTokenizer;
use yalis_engine::GenerateOptions;

use crate::common::{banner, build_engine, check_seq_len, provenance, ModelArgs};
use crate::launch::Launch;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A prompt; repeat the flag for a batch.
    #[arg(long, required = true)]
    pub prompt: Vec<String>,
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub temperature: f32,
    /// Keep the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Keep the most likely tokens up to this cumulative probability (1: all).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Generate max-new-tokens even past an end-of-sequence token.
    #[arg(long)]
    pub ignore_eos: bool,
    #[arg(long, default_value_t = 1)]
    pub tp: usize,
    #[arg(long, default_value_t = 1)]
    pub pp: usize,
    /// Append, per prompt, a JSON line with the input ids and the generated ids.
    #[arg(long)]
    pub output_json: Option<PathBuf>,
    /// Write a safetensors file whose tensor `logits` (float32, [num_prompts, max_new_tokens,
    /// vocab]) holds the logits each generated token was chosen from; steps after a sequence
    /// ended at eos are NaN.
    #[arg(long)]
    pub logits_out: Option<PathBuf>,
}

fn tokenizer(a: &GenerateArgs, model: &yalis_core::ResolvedModel, note: bool) -> Result<TextTokenizer> {
    let bos = model.config.bos_token_id;
    match &model.dir {
        Some(dir) if dir.join("tokenizer.json").exists() => {
            Ok(TextTokenizer::from_file(&dir.join("tokenizer.json"), bos)?)
        }
        _ => {
            if note {
                eprintln!(
                    "note: {} has no tokenizer.json; using the built-in byte tokenizer",
                    a.model.model
                );
            }
            Ok(TextTokenizer::bytes(bos, model.config.eos_token_ids.first().copied()))
        }
    }
}

pub fn run(a: GenerateArgs) -> Result<()> {
    let model = a.model.resolve()?;
    let mut rt = a.model.runtime(a.tp * a.pp)?;
    let sampling = SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        seed: a.seed,
    };
    sampling.validate()?;
    if a.max_new_tokens == 0 {
        bail!("--max-new-tokens must be at least 1");
    }
    let launch = Launch::new(&a.model, &[(a.tp, a.pp)])?;
    let prints = launch.prints(a.tp * a.pp);
    let tok = tokenizer(&a, &model, prints)?;
    let prompts: Vec<Vec<u32>> = a
        .prompt
        .iter()
        .map(|p| tok.encode(p))
        .collect::<yalis_core::Result<_>>()?;
    let max_seq = prompts.iter().map(Vec::len).max().unwrap_or(0) + a.max_new_tokens;
    check_seq_len(&model, max_seq)?;
    let plan = a.model.plan(&model.config, a.tp, a.pp)?;
    let src = a.model.weight_source(&model, a.seed)?;
    let mem = MemoryParams {
        dtype_bytes: 2,
        batch_size: prompts.len(),
        max_seq_len: max_seq,
    };
    if let Some(cap) = rt.capacity {
        plan.check_fits(&model.config, mem, cap)?;
    }
    launch.locate(&mut rt, &plan);
    if prints {
        eprintln!("{}", banner(&model, &plan, &rt, src.as_ref(), mem));
    }

    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        sampling,
        ignore_eos: a.ignore_eos,
        keep_logits: a.logits_out.is_some(),
    };
    let sampling_rank = (plan.pp - 1) * plan.tp;
    let outs = launch.run(&plan, |rp, comms| {
        let mut engine = build_engine(&model, rp, comms, src.as_ref(), &rt, prompts.len(), max_seq)?;
        engine.generate(&prompts, &opts)
    })?;
    // Every rank holds the broadcast tokens: rank 0 prints them; the logits exist only on the
    // sampling rank, which writes them. A process holds none of them when its children ran the
    // ranks.
    if let (Some(path), Some(g)) = (&a.logits_out, outs.get(sampling_rank)) {
        write_logits(path, &g.logits, a.max_new_tokens, model.config.vocab_size)?;
    }
    let Some(g) = outs.get(0) else {
        return Ok(());
    };
    for (i, (p, ids)) in a.prompt.iter().zip(&g.tokens).enumerate() {
        let text = tok.decode(ids)?;
        println!("[{i}] {p}{text}");
        if let Some(path) = &a.output_json {
            let mut rec = provenance(&plan, &rt);
            rec["kind"] = json!("generate");
            rec["model"] = json!(model.name);
            rec["prompt_index"] = json!(i);
            rec["prompt"] = json!(p);
            rec["input_ids"] = json!(prompts[i]);
            rec["generated_ids"] = json!(ids);
            rec["text"] = json!(text);
            rec["sampling"] = json!({"temperature": a.temperature, "top_k": a.top_k, "top_p": a.top_p, "seed": a.seed});
            append_jsonl(path, &rec).with_context(|| format!("appending to {}", path.display()))?;
        }
    }
    eprintln!(
        "prefill {:.2} ms, {} decode steps, {:.3} ms/step mean",
        g.prefill.as_secs_f64() * 1e3,
        g.decode_steps.len(),
        g.decode_steps.iter().map(|d| d.as_secs_f64() * 1e3).sum::<f64>() / g.decode_steps.len().max(1) as f64
    );
    Ok(())
}

fn write_logits(path: &std::path::Path, logits: &[Vec<Vec<f32>>], steps: usize, vocab: usize) -> Result<()> {
    let mut flat = vec![f32::NAN; logits.len() * steps * vocab];
    for (p, per_prompt) in logits.iter().enumerate() {
        for (s, row) in per_prompt.iter().enumerate() {
            let off = (p * steps + s) * vocab;
            flat[off..off + vocab].copy_from_slice(row);
        }
    }
    let bytes: Vec<u8> = flat.iter().flat_map(|x| x.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![logits.len(), steps, vocab], &bytes)?;
    safetensors::serialize_to_file([("logits", view)], None, path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
