//! The generation loop: prefill every prompt as one packed batch, then batched decode, one token
//! per active sequence per step. Every rank runs the same loop; the last stage's first TP rank
//! samples and broadcasts the tokens to all ranks.

use std::time::{Duration, Instant};

use yalis_comm::HostComm;
use yalis_core::rng::stream_key;
use yalis_core::sampling::SamplingParams;

use crate::backend::{Backend, SeqChunk, StepBatch, StepInputs};
use crate::llama::Llama;
use crate::{Error, Result};

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    pub ignore_eos: bool,
    /// Keep the logits each token was chosen from (on the sampling rank).
    pub keep_logits: bool,
}

#[derive(Clone, Debug, Default)]
pub struct Generation {
    /// Generated ids per prompt (an eos, when hit, is the last one).
    pub tokens: Vec<Vec<u32>>,
    /// `[prompt][step][vocab]`, when asked for and on the sampling rank; empty otherwise.
    pub logits: Vec<Vec<Vec<f32>>>,
    pub prefill: Duration,
    pub decode_steps: Vec<Duration>,
}

/// The decode step of sequences `seqs`: each feeds its last token at the position after it.
fn decode_batch(prompts: &[Vec<u32>], tokens: &[Vec<u32>], seqs: &[usize]) -> StepBatch {
    StepBatch {
        seqs: seqs
            .iter()
            .map(|&i| SeqChunk {
                slot: i,
                start_pos: prompts[i].len() + tokens[i].len() - 1,
                len: 1,
            })
            .collect(),
    }
}

pub struct Engine<B: Backend> {
    pub backend: B,
    pub model: Llama<B>,
    world: Box<dyn HostComm>,
    caches: Vec<B::KvCache>,
    max_batch: usize,
    max_seq: usize,
    cuda_graphs: bool,
    /// Micro-batches of pipelined decode (1: the stages take each step in turn).
    microbatches: usize,
}

impl<B: Backend> Engine<B> {
    /// Allocates the KV cache for `max_batch` sequences of up to `max_seq` tokens.
    pub fn new(
        backend: B,
        model: Llama<B>,
        world: Box<dyn HostComm>,
        max_batch: usize,
        max_seq: usize,
    ) -> Result<Self> {
        let caches = model.alloc_caches(&backend, max_batch, max_seq)?;
        Ok(Engine {
            backend,
            model,
            world,
            caches,
            max_batch,
            max_seq,
            cuda_graphs: true,
            microbatches: 1,
        })
    }

    fn sampling_rank(&self) -> usize {
        (self.model.plan.pp - 1) * self.model.plan.tp
    }

    fn check(&self, prompts: &[Vec<u32>], opts: &GenerateOptions) -> Result<()> {
        let err = |m: String| Err(Error::Invalid(m));
        if prompts.is_empty() || prompts.len() > self.max_batch {
            return err(format!(
                "{} prompts for a KV cache sized for {} sequences",
                prompts.len(),
                self.max_batch
            ));
        }
        if opts.max_new_tokens == 0 {
            return err("max new tokens must be at least 1".into());
        }
        let vocab = self.model.cfg.vocab_size;
        for (i, p) in prompts.iter().enumerate() {
            if p.is_empty() {
                return err(format!("prompt {i} is empty"));
            }
            if p.len() + opts.max_new_tokens > self.max_seq {
                return err(format!(
                    "prompt {i} has {} tokens; with {} new tokens it exceeds the {} positions the KV cache holds",
                    p.len(),
                    opts.max_new_tokens,
                    self.max_seq
                ));
            }
            if let Some(id) = p.iter().find(|&&id| id as usize >= vocab) {
                return err(format!("prompt {i} holds token id {id}, outside vocab_size={vocab}"));
            }
        }
        opts.sampling.validate()?;
        Ok(())
    }

    /// Runs one step and returns the next token of every sequence in `batch`, on every rank.
    fn step(
        &mut self,
        inputs: StepInputs,
        sampling: &SamplingParams,
        keep: Option<&mut Vec<Vec<Vec<f32>>>>,
        seq_ids: &[usize],
    ) -> Result<Vec<u32>> {
        let n = inputs.batch.seqs.len();
        self.run_stage(inputs, sampling, keep, seq_ids)?;
        self.sampled(n)
    }

    /// This stage's part of one step: the forward (receiving from and sending to the
    /// neighbouring stages) and, on the last stage, sampling. Decode steps run as one CUDA graph
    /// per batch size where the backend has graphs (not while logits are kept: the host then
    /// reads them between the forward and the sampler).
    fn run_stage(
        &mut self,
        inputs: StepInputs,
        sampling: &SamplingParams,
        keep: Option<&mut Vec<Vec<Vec<f32>>>>,
        seq_ids: &[usize],
    ) -> Result<()> {
        let b = &self.backend;
        let n = inputs.batch.seqs.len();
        let vocab = self.model.cfg.vocab_size;
        b.begin_step(&inputs)?;
        let decode = inputs.batch.seqs.iter().all(|s| s.len == 1);
        let key = n as u64;
        let graphed = self.cuda_graphs && decode && keep.is_none();
        if !(graphed && b.graph_launch(key)?) {
            let capturing = graphed && b.graph_begin(key)?;
            let logits = self.model.forward(b, inputs.batch, inputs.ids, &mut self.caches)?;
            if let Some(logits) = &logits {
                b.sample(logits, vocab, sampling)?;
                if let Some(out) = keep {
                    let host = b.to_host(logits)?;
                    for (row, &seq) in host.chunks_exact(host.len() / n).zip(seq_ids) {
                        out[seq].push(row[..vocab].to_vec());
                    }
                }
            }
            if capturing {
                b.graph_end(key)?;
                b.graph_launch(key)?;
            }
        }
        Ok(())
    }

    /// The `n` tokens the last stage's first TP rank sampled last, on every rank (a world
    /// collective).
    fn sampled(&self, n: usize) -> Result<Vec<u32>> {
        let root = self.sampling_rank();
        let mut next = if self.model.plan.is_last_stage() && self.world.rank() == root {
            self.backend.sampled_tokens(n)?
        } else {
            vec![0u32; n]
        };
        self.world.broadcast_u32(&mut next, root)?;
        Ok(next)
    }

    /// Microseconds per TP all-reduce of `elems` activations (see `Backend::time_all_reduce`).
    pub fn time_all_reduce(&self, elems: usize) -> Result<Option<f64>> {
        self.backend.time_all_reduce(elems)
    }

    /// CUDA graphs for decode steps (on by default; backends without graphs ignore it).
    pub fn set_cuda_graphs(&mut self, on: bool) {
        self.cuda_graphs = on;
    }

    /// Pipelined decode with PP > 1: the sequences are split into `m` micro-batches (at least PP
    /// of them) that flow through the stages one behind the other, so the stages work at once.
    /// 1 (the default) runs every decode step through the stages in turn.
    pub fn set_pp_microbatches(&mut self, m: usize) {
        self.microbatches = m.max(1);
    }

    pub fn generate(&mut self, prompts: &[Vec<u32>], opts: &GenerateOptions) -> Result<Generation> {
        self.check(prompts, opts)?;
        let n = prompts.len();
        let eos = self.model.cfg.eos_token_ids.clone();
        let keys: Vec<u64> = (0..n as u64).map(|i| stream_key(opts.sampling.seed, i)).collect();
        let mut out = Generation {
            tokens: vec![Vec::new(); n],
            ..Default::default()
        };
        let mut logits = opts.keep_logits.then(|| vec![Vec::new(); n]);

        let mut active: Vec<usize> = (0..n).collect();
        let mut batch = StepBatch {
            seqs: active
                .iter()
                .map(|&i| SeqChunk {
                    slot: i,
                    start_pos: 0,
                    len: prompts[i].len(),
                })
                .collect(),
        };
        let mut ids: Vec<u32> = prompts.concat();
        for step in 0..opts.max_new_tokens {
            let t0 = Instant::now();
            let inputs = StepInputs {
                batch: &batch,
                ids: &ids,
                sample_keys: &active.iter().map(|&i| keys[i]).collect::<Vec<_>>(),
                sample_counters: &active.iter().map(|&i| out.tokens[i].len() as u64).collect::<Vec<_>>(),
            };
            let next = self.step(inputs, &opts.sampling, logits.as_mut(), &active)?;
            let dt = t0.elapsed();
            if step == 0 {
                out.prefill = dt;
            } else {
                out.decode_steps.push(dt);
            }
            let mut still = Vec::with_capacity(active.len());
            for (&seq, &tok) in active.iter().zip(&next) {
                out.tokens[seq].push(tok);
                if opts.ignore_eos || !eos.contains(&tok) {
                    still.push(seq);
                }
            }
            // Next step: each unfinished sequence feeds its new token at the next position.
            ids = active
                .iter()
                .zip(&next)
                .filter(|(s, _)| still.contains(s))
                .map(|(_, &t)| t)
                .collect();
            active = still;
            if active.is_empty() {
                break;
            }
            if step == 0 && self.microbatches > 1 && self.model.plan.pp > 1 && opts.max_new_tokens > 1 {
                self.decode_pipelined(prompts, opts, &keys, active, &mut out, logits.as_mut())?;
                break;
            }
            batch = decode_batch(prompts, &out.tokens, &active);
        }
        out.logits = logits.unwrap_or_default();
        Ok(out)
    }

    /// Decode after the prefill with the `active` sequences split into M = max(microbatches, PP)
    /// contiguous micro-batches (some may be empty). At tick t stage s runs micro-batch
    /// (t - s) mod M, so the stages work on different micro-batches at once; the last stage
    /// samples micro-batch (t - PP + 1) mod M and every rank learns its tokens (and which of its
    /// sequences ended) from the tick's broadcast. Because M >= PP, those tokens are known before
    /// the first stage takes that micro-batch again. Sampling keys and counters are per
    /// sequence, so the tokens are those of the unpipelined loop.
    fn decode_pipelined(
        &mut self,
        prompts: &[Vec<u32>],
        opts: &GenerateOptions,
        keys: &[u64],
        active: Vec<usize>,
        out: &mut Generation,
        mut logits: Option<&mut Vec<Vec<Vec<f32>>>>,
    ) -> Result<()> {
        struct Micro {
            seqs: Vec<usize>,
            steps: usize,
            last: Instant,
        }
        let (stages, stage) = (self.model.plan.pp, self.model.plan.pp_stage);
        let m = self.microbatches.max(stages);
        let per = active.len().div_ceil(m);
        let decode_steps = opts.max_new_tokens - 1;
        let start = Instant::now();
        let mut micro: Vec<Micro> = (0..m)
            .map(|g| Micro {
                seqs: active.iter().copied().skip(g * per).take(per).collect(),
                steps: 0,
                last: start,
            })
            .collect();
        let alive = |mb: &Micro| !mb.seqs.is_empty() && mb.steps < decode_steps;
        let eos = self.model.cfg.eos_token_ids.clone();
        let mut t = 0usize;
        while micro.iter().any(alive) {
            // This stage's micro-batch: its step k, if it still runs.
            if let Some(g) = t.checked_sub(stage).map(|d| (d % m, d / m)).and_then(|(g, k)| {
                let mb = &micro[g];
                (alive(mb) && mb.steps == k).then_some(g)
            }) {
                let seqs = micro[g].seqs.clone();
                let batch = decode_batch(prompts, &out.tokens, &seqs);
                let ids: Vec<u32> = seqs
                    .iter()
                    .map(|&i| *out.tokens[i].last().expect("a prefill token"))
                    .collect();
                let inputs = StepInputs {
                    batch: &batch,
                    ids: &ids,
                    sample_keys: &seqs.iter().map(|&i| keys[i]).collect::<Vec<_>>(),
                    sample_counters: &seqs.iter().map(|&i| out.tokens[i].len() as u64).collect::<Vec<_>>(),
                };
                self.run_stage(inputs, &opts.sampling, logits.as_deref_mut(), &seqs)?;
            }
            // The last stage's micro-batch of this tick: every rank takes its tokens.
            if let Some(g) = (t + 1).checked_sub(stages).map(|d| (d % m, d / m)).and_then(|(g, k)| {
                let mb = &micro[g];
                (alive(mb) && mb.steps == k).then_some(g)
            }) {
                let next = self.sampled(micro[g].seqs.len())?;
                let mb = &mut micro[g];
                let now = Instant::now();
                out.decode_steps.push(now - mb.last);
                mb.last = now;
                mb.steps += 1;
                let mut still = Vec::with_capacity(mb.seqs.len());
                for (&seq, &tok) in mb.seqs.iter().zip(&next) {
                    out.tokens[seq].push(tok);
                    if opts.ignore_eos || !eos.contains(&tok) {
                        still.push(seq);
                    }
                }
                mb.seqs = still;
            }
            t += 1;
        }
        Ok(())
    }
}
