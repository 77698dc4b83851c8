//! Llama, written once over the backend. One decode step on one rank:
//!
//! ```text
//! ids -> embedding (first stage) | receive hidden (later stages)
//!   per layer: RMSNorm -> QKV -> RoPE -> KV write -> attention -> O (+all-reduce) -> add+RMSNorm
//!              -> gate|up -> SiLU*mul -> down (+all-reduce) -> add
//! -> send hidden (not last stage) | final RMSNorm -> LM head (+gather) -> logits (last stage)
//! ```

use yalis_core::weights::{HostData, HostTensor, Slice, WeightSource};
use yalis_core::{ModelConfig, RankPlan};

use crate::backend::{Backend, QkvLayout, StepBatch, WeightPiece};
use crate::layers::{ColumnParallelLinear, ParallelLmHead, Piece, RowParallelLinear, VocabParallelEmbedding};
use crate::Result;

pub struct Attention<B: Backend> {
    qkv: ColumnParallelLinear<B>,
    o_proj: RowParallelLinear<B>,
    layout: QkvLayout,
}

pub struct Mlp<B: Backend> {
    gate_up: ColumnParallelLinear<B>,
    down: RowParallelLinear<B>,
    intermediate_per_rank: usize,
}

pub struct DecoderLayer<B: Backend> {
    input_norm: B::Weight,
    attn: Attention<B>,
    post_norm: B::Weight,
    mlp: Mlp<B>,
}

/// The part of the model one rank holds: its PP stage's layers, its TP shards.
pub struct Llama<B: Backend> {
    pub cfg: ModelConfig,
    pub plan: RankPlan,
    embed: Option<VocabParallelEmbedding<B>>,
    layers: Vec<DecoderLayer<B>>,
    final_norm: Option<B::Weight>,
    lm_head: Option<ParallelLmHead<B>>,
    rope_cos: B::Weight,
    rope_sin: B::Weight,
    eps: f32,
}

impl<B: Backend> Attention<B> {
    fn forward(
        &self,
        b: &B,
        x: &B::Tensor,
        batch: &StepBatch,
        cache: &mut B::KvCache,
        rope: (&B::Weight, &B::Weight),
        hidden: usize,
    ) -> Result<B::Tensor> {
        let t = batch.num_tokens();
        let l = self.layout;
        let mut qkv = b.alloc(t, l.width())?;
        self.qkv.forward(b, x, &mut qkv)?;
        b.rope_write_kv(&mut qkv, l, batch, rope.0, rope.1, cache)?;
        let mut attn = b.alloc(t, l.q_heads * l.head_dim)?;
        b.attention(&qkv, l, batch, cache, &mut attn)?;
        let mut out = b.alloc(t, hidden)?;
        self.o_proj.forward(b, &attn, &mut out)?;
        Ok(out)
    }
}

impl<B: Backend> Mlp<B> {
    fn forward(&self, b: &B, x: &B::Tensor, rows: usize, hidden: usize) -> Result<B::Tensor> {
        let mut gate_up = b.alloc(rows, 2 * self.intermediate_per_rank)?;
        self.gate_up.forward(b, x, &mut gate_up)?;
        let mut out = b.alloc(rows, hidden)?;
        self.down.forward_silu(b, &gate_up, &mut out)?;
        Ok(out)
    }
}

impl<B: Backend> Llama<B> {
    /// Loads this rank's shards. `max_positions` sizes the RoPE tables; `progress(done, total)`
    /// is called after each tensor group.
    pub fn load(
        b: &B,
        cfg: &ModelConfig,
        plan: &RankPlan,
        src: &dyn WeightSource,
        max_positions: usize,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        let h = cfg.hidden_size;
        let hd = cfg.head_dim;
        let (v, vocab_rows) = (cfg.vocab_size, plan.vocab_start..plan.vocab_end);
        let total = plan.layers.len() + 2;
        let one = |name: &str, shape: Vec<usize>, slice: Slice, pad: Option<usize>| -> Result<B::Weight> {
            b.load_weight(src, &[WeightPiece { name, shape, slice }], pad)
        };
        let norm = |name: &str| one(name, vec![h], Slice::Full, None);

        let embed = if plan.is_first_stage() {
            let t = src.load("model.embed_tokens.weight", &[v, h], Slice::Rows(vocab_rows.clone()))?;
            Some(VocabParallelEmbedding {
                table: b.upload(&t)?,
                vocab_start: plan.vocab_start,
            })
        } else {
            None
        };
        progress(1, total);

        let q_rows = plan.q_head_start * hd..(plan.q_head_start + plan.num_heads_per_rank) * hd;
        let kv_rows = plan.kv_head_start * hd..(plan.kv_head_start + plan.num_kv_heads_per_rank) * hd;
        let i_rows = plan.intermediate_start..plan.intermediate_start + plan.intermediate_per_rank;
        let (q_full, kv_full, i_full) = (
            cfg.num_attention_heads * hd,
            cfg.num_key_value_heads * hd,
            cfg.intermediate_size,
        );
        let layout = QkvLayout {
            q_heads: plan.num_heads_per_rank,
            kv_heads: plan.num_kv_heads_per_rank,
            head_dim: hd,
        };
        let mut layers = Vec::with_capacity(plan.layers.len());
        for (k, i) in plan.layers.clone().enumerate() {
            let p = format!("model.layers.{i}");
            let (q, kk, vv) = (
                format!("{p}.self_attn.q_proj.weight"),
                format!("{p}.self_attn.k_proj.weight"),
                format!("{p}.self_attn.v_proj.weight"),
            );
            let (g, u) = (format!("{p}.mlp.gate_proj.weight"), format!("{p}.mlp.up_proj.weight"));
            layers.push(DecoderLayer {
                input_norm: norm(&format!("{p}.input_layernorm.weight"))?,
                attn: Attention {
                    qkv: ColumnParallelLinear::load(
                        b,
                        src,
                        &[
                            Piece {
                                name: &q,
                                full_rows: q_full,
                                rows: q_rows.clone(),
                            },
                            Piece {
                                name: &kk,
                                full_rows: kv_full,
                                rows: kv_rows.clone(),
                            },
                            Piece {
                                name: &vv,
                                full_rows: kv_full,
                                rows: kv_rows.clone(),
                            },
                        ],
                        h,
                    )?,
                    o_proj: RowParallelLinear::load(
                        b,
                        src,
                        &format!("{p}.self_attn.o_proj.weight"),
                        [h, q_full],
                        q_rows.clone(),
                    )?,
                    layout,
                },
                post_norm: norm(&format!("{p}.post_attention_layernorm.weight"))?,
                mlp: Mlp {
                    gate_up: ColumnParallelLinear::load(
                        b,
                        src,
                        &[
                            Piece {
                                name: &g,
                                full_rows: i_full,
                                rows: i_rows.clone(),
                            },
                            Piece {
                                name: &u,
                                full_rows: i_full,
                                rows: i_rows.clone(),
                            },
                        ],
                        h,
                    )?,
                    down: RowParallelLinear::load(
                        b,
                        src,
                        &format!("{p}.mlp.down_proj.weight"),
                        [h, i_full],
                        i_rows.clone(),
                    )?,
                    intermediate_per_rank: plan.intermediate_per_rank,
                },
            });
            progress(k + 2, total);
        }

        let (final_norm, lm_head) = if plan.is_last_stage() {
            let name = if cfg.tie_word_embeddings {
                "model.embed_tokens.weight"
            } else {
                "lm_head.weight"
            };
            let weight = one(
                name,
                vec![v, h],
                Slice::Rows(plan.lm_head.clone()),
                Some(plan.lm_head_padded),
            )?;
            let head = ParallelLmHead {
                weight,
                rows: plan.lm_head_padded,
                gather: !plan.lm_head_replicated && plan.tp > 1,
            };
            (Some(norm("model.norm.weight")?), Some(head))
        } else {
            (None, None)
        };
        progress(total, total);

        let inv_freq = cfg.rope_inv_freq();
        let table = |f: fn(f64) -> f64| HostTensor {
            shape: vec![max_positions, hd / 2],
            data: HostData::F32(
                (0..max_positions)
                    .flat_map(|p| inv_freq.iter().map(move |w| f(p as f64 * w) as f32))
                    .collect(),
            ),
        };
        Ok(Llama {
            cfg: cfg.clone(),
            plan: plan.clone(),
            embed,
            layers,
            final_norm,
            lm_head,
            rope_cos: b.upload_table(&table(f64::cos))?,
            rope_sin: b.upload_table(&table(f64::sin))?,
            eps: cfg.rms_norm_eps as f32,
        })
    }

    /// KV heads per rank and head dim, for sizing caches; one cache per layer of this stage.
    pub fn alloc_caches(&self, b: &B, slots: usize, max_seq: usize) -> Result<Vec<B::KvCache>> {
        (0..self.layers.len())
            .map(|_| b.alloc_kv_cache(slots, max_seq, self.plan.num_kv_heads_per_rank, self.cfg.head_dim))
            .collect()
    }

    /// One forward step of this stage. The first stage embeds `ids` (one per packed token); later
    /// stages receive the hidden state from the previous one. The last stage returns the logits
    /// of each sequence's last token, `[seqs, >= vocab_size]`; other stages return None.
    pub fn forward(
        &self,
        b: &B,
        batch: &StepBatch,
        ids: &[u32],
        caches: &mut [B::KvCache],
    ) -> Result<Option<B::Tensor>> {
        let (t, h) = (batch.num_tokens(), self.cfg.hidden_size);
        let rope = (&self.rope_cos, &self.rope_sin);
        let mut hidden = b.alloc(t, h)?;
        match &self.embed {
            Some(embed) => embed.forward(b, ids, &mut hidden)?,
            None => b.recv_prev(&mut hidden)?,
        }
        let mut x = b.alloc(t, h)?;
        // The MLP output of the previous layer, added to `hidden` together with the next norm.
        let mut pending: Option<B::Tensor> = None;
        for (layer, cache) in self.layers.iter().zip(caches.iter_mut()) {
            match pending.take() {
                None => b.rms_norm(&hidden, &layer.input_norm, self.eps, &mut x)?,
                Some(d) => b.add_rms_norm(&mut hidden, &d, &layer.input_norm, self.eps, &mut x)?,
            }
            let attn = layer.attn.forward(b, &x, batch, cache, rope, h)?;
            b.add_rms_norm(&mut hidden, &attn, &layer.post_norm, self.eps, &mut x)?;
            pending = Some(layer.mlp.forward(b, &x, t, h)?);
        }
        let (Some(norm), Some(head)) = (&self.final_norm, &self.lm_head) else {
            if let Some(d) = pending {
                b.add(&mut hidden, &d)?;
            }
            b.send_next(&hidden)?;
            return Ok(None);
        };
        let last_rows = batch.last_rows();
        let mut last = b.alloc(last_rows.len(), h)?;
        b.select_rows(&hidden, &last_rows, &mut last)?;
        let mut normed = b.alloc(last_rows.len(), h)?;
        match pending {
            Some(d) => {
                let mut d_last = b.alloc(last_rows.len(), h)?;
                b.select_rows(&d, &last_rows, &mut d_last)?;
                b.add_rms_norm(&mut last, &d_last, norm, self.eps, &mut normed)?;
            }
            None => b.rms_norm(&last, norm, self.eps, &mut normed)?,
        }
        Ok(Some(head.forward(b, &normed, last_rows.len(), self.plan.tp)?))
    }
}
