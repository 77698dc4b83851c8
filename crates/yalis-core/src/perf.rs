//! The analytic counts a run is measured against: bytes one decode step must read and FLOPs a
//! prefill must do, per rank.

use crate::config::ModelConfig;
use crate::plan::RankPlan;

/// Parameters of one decoder layer on this rank.
fn layer_params(cfg: &ModelConfig, r: &RankPlan) -> f64 {
    let h = cfg.hidden_size as f64;
    let q = (r.num_heads_per_rank * r.head_dim) as f64;
    let kv = (r.num_kv_heads_per_rank * r.head_dim) as f64;
    h * (q + 2.0 * kv) + q * h + 3.0 * h * r.intermediate_per_rank as f64 + 2.0 * h
}

/// Bytes one decode step reads on rank `r` for `batch` sequences whose contexts average
/// `context` tokens: every layer weight once, the LM head shard and final norm (last stage), the
/// batch's embedding rows (first stage), and the K and V of every cached position.
pub fn decode_bytes(cfg: &ModelConfig, r: &RankPlan, batch: usize, context: f64, dtype_bytes: f64) -> DecodeBytes {
    let h = cfg.hidden_size as f64;
    let mut weights = r.layers.len() as f64 * layer_params(cfg, r);
    if r.is_first_stage() {
        weights += batch as f64 * h;
    }
    if r.is_last_stage() {
        weights += h + r.lm_head.len() as f64 * h;
    }
    let kv = r.layers.len() as f64 * batch as f64 * context * 2.0 * (r.num_kv_heads_per_rank * r.head_dim) as f64;
    DecodeBytes {
        weights: weights * dtype_bytes,
        kv_cache: kv * dtype_bytes,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct DecodeBytes {
    pub weights: f64,
    pub kv_cache: f64,
}

impl DecodeBytes {
    pub fn total(&self) -> f64 {
        self.weights + self.kv_cache
    }
}

/// FLOPs of a prefill of `batch` prompts of `input_len` tokens on rank `r`: the GEMMs
/// (2 per parameter per token), causal attention (QK^T and PV over the `L(L+1)/2` visible
/// pairs), and the LM head for each sequence's last token.
pub fn prefill_flops(cfg: &ModelConfig, r: &RankPlan, batch: usize, input_len: usize) -> f64 {
    let tokens = (batch * input_len) as f64;
    let layers = r.layers.len() as f64;
    let gemm = 2.0 * tokens * layers * layer_params(cfg, r);
    let pairs = batch as f64 * (input_len * (input_len + 1) / 2) as f64;
    let attn = layers * 4.0 * pairs * (r.num_heads_per_rank * r.head_dim) as f64;
    let head = if r.is_last_stage() {
        2.0 * batch as f64 * (r.lm_head_padded * cfg.hidden_size) as f64
    } else {
        0.0
    };
    gemm + attn + head
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ParallelPlan, ResolvedModel};

    #[test]
    fn llama8b_counts() {
        let c = ResolvedModel::resolve("llama-8b").unwrap().config;
        let plan = ParallelPlan::new(&c, 1, 1).unwrap();
        let d = decode_bytes(&c, &plan.ranks[0], 1, 1088.0, 2.0);
        // 8.03e9 params minus the 0.525e9 embedding table, in bf16: ~15.0 GB per step.
        assert!((d.weights / 1e9 - 15.01).abs() < 0.05, "{}", d.weights);
        // K and V: 32 layers x 1088 positions x 2 x 1024 x 2 bytes = 143 MB.
        assert!((d.kv_cache / 1e6 - 142.6).abs() < 0.5, "{}", d.kv_cache);
        // 2 x 6.98e9 non-embedding params x 2048 tokens ~ 28.6 TFLOP, plus attention.
        let f = prefill_flops(&c, &plan.ranks[0], 1, 2048);
        assert!((28.0e12..31.0e12).contains(&f), "{f}");
    }
}
