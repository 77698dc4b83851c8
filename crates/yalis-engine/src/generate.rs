//! The generation loop: prefill every prompt as one packed batch, then batched decode, one token
//! per active sequence per step. Every rank runs the same loop; the last stage's first TP rank
//! samples and broadcasts the tokens to all ranks.

use std::time::{Duration, Instant};

use yalis_comm::HostComm;
use yalis_core::sampling::{Sampler, SamplingParams};

use crate::backend::{Backend, SeqChunk, StepBatch};
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

pub struct Engine<B: Backend> {
    pub backend: B,
    pub model: Llama<B>,
    world: Box<dyn HostComm>,
    caches: Vec<B::KvCache>,
    max_batch: usize,
    max_seq: usize,
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
        batch: &StepBatch,
        ids: &[u32],
        samplers: &mut [Sampler],
        seq_ids: &[usize],
        logits_out: Option<&mut Vec<Vec<Vec<f32>>>>,
    ) -> Result<Vec<u32>> {
        let logits = self.model.forward(&self.backend, batch, ids, &mut self.caches)?;
        let mut next = vec![0u32; batch.seqs.len()];
        let root = self.sampling_rank();
        if self.world.rank() == root {
            let logits = logits.expect("the sampling rank is on the last stage");
            let host = self.backend.to_host(&logits)?;
            let width = host.len() / batch.seqs.len();
            let vocab = self.model.cfg.vocab_size;
            let mut keep = logits_out;
            for (k, row) in host.chunks_exact(width).enumerate() {
                let row = &row[..vocab];
                next[k] = samplers[seq_ids[k]].sample(row);
                if let Some(out) = keep.as_deref_mut() {
                    out[seq_ids[k]].push(row.to_vec());
                }
            }
        }
        self.world.broadcast_u32(&mut next, root)?;
        Ok(next)
    }

    pub fn generate(&mut self, prompts: &[Vec<u32>], opts: &GenerateOptions) -> Result<Generation> {
        self.check(prompts, opts)?;
        let n = prompts.len();
        let eos = self.model.cfg.eos_token_ids.clone();
        let mut samplers: Vec<Sampler> = (0..n).map(|i| Sampler::new(opts.sampling, i as u64)).collect();
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
            let next = self.step(&batch, &ids, &mut samplers, &active, logits.as_mut())?;
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
            batch = StepBatch {
                seqs: active
                    .iter()
                    .map(|&i| SeqChunk {
                        slot: i,
                        start_pos: prompts[i].len() + out.tokens[i].len() - 1,
                        len: 1,
                    })
                    .collect(),
            };
        }
        out.logits = logits.unwrap_or_default();
        Ok(out)
    }
}
