//! The op set a backend provides. The model calls these and nothing else, so the CPU reference
//! and the CUDA backend run the same Llama.

use yalis_core::sampling::SamplingParams;
use yalis_core::weights::{HostData, HostTensor, Slice, WeightSource};

use crate::{Error, Result};

/// One sequence's part of a step: `len` new tokens at positions `start_pos..start_pos + len`,
/// cached in KV slot `slot`. Prefill has `start_pos = 0, len = prompt length`; decode has
/// `len = 1`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeqChunk {
    pub slot: usize,
    pub start_pos: usize,
    pub len: usize,
}

/// The sequences of one forward step; their tokens are packed in this order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepBatch {
    pub seqs: Vec<SeqChunk>,
}

impl StepBatch {
    pub fn num_tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.len).sum()
    }

    /// Position of every packed token.
    pub fn positions(&self) -> Vec<usize> {
        self.seqs
            .iter()
            .flat_map(|s| s.start_pos..s.start_pos + s.len)
            .collect()
    }

    /// Packed row of each sequence's last token.
    pub fn last_rows(&self) -> Vec<usize> {
        self.seqs
            .iter()
            .scan(0, |end, s| {
                *end += s.len;
                Some(*end - 1)
            })
            .collect()
    }
}

/// Column layout of a fused QKV activation `[tokens, (q_heads + 2 kv_heads) * head_dim]`:
/// all query heads, then the key heads, then the value heads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QkvLayout {
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl QkvLayout {
    pub fn width(&self) -> usize {
        (self.q_heads + 2 * self.kv_heads) * self.head_dim
    }
}

/// What one step feeds in: the batch, a token id per packed token (first stage), and per
/// sequence the sampling stream key and draw counter (see `yalis_core::rng::stream_key`).
#[derive(Clone, Copy, Debug)]
pub struct StepInputs<'a> {
    pub batch: &'a StepBatch,
    pub ids: &'a [u32],
    pub sample_keys: &'a [u64],
    pub sample_counters: &'a [u64],
}

/// Part of a weight: `slice` of tensor `name` of full shape `shape`.
#[derive(Clone, Debug)]
pub struct WeightPiece<'a> {
    pub name: &'a str,
    pub shape: Vec<usize>,
    pub slice: Slice,
}

/// The op set. Activations are 2-D `[rows, cols]`; weights keep the HF `[out, in]` layout.
/// Every op writes all of its output.
pub trait Backend {
    type Tensor;
    type Weight;
    /// One layer's K and V for every slot: `[slots, max_seq, kv_heads, head_dim]` each.
    type KvCache;

    fn describe(&self) -> String;
    fn upload(&self, w: &HostTensor) -> Result<Self::Weight>;
    /// One weight from `pieces` stacked by rows, padded with zero rows to `padded_rows`. The
    /// default reads through the host; a device backend may copy from a memory map or
    /// generate dummy weights in place.
    fn load_weight(
        &self,
        src: &dyn WeightSource,
        pieces: &[WeightPiece],
        padded_rows: Option<usize>,
    ) -> Result<Self::Weight> {
        let mut parts = pieces
            .iter()
            .map(|p| src.load(p.name, &p.shape, p.slice.clone()))
            .collect::<yalis_core::Result<Vec<_>>>()?;
        let rows: usize = parts.iter().map(|p| p.shape[0]).sum();
        if let Some(padded) = padded_rows.filter(|&p| p > rows) {
            let cols = parts[0].shape.get(1).copied().unwrap_or(1);
            let n = (padded - rows) * cols;
            let data = match parts[0].data {
                HostData::F32(_) => HostData::F32(vec![0.0; n]),
                HostData::Bf16(_) => HostData::Bf16(vec![half::bf16::ZERO; n]),
            };
            parts.push(HostTensor {
                shape: vec![padded - rows, cols],
                data,
            });
        }
        self.upload(&concat_rows(parts)?)
    }
    fn alloc(&self, rows: usize, cols: usize) -> Result<Self::Tensor>;
    /// An f32 activation (logits), whatever the backend's activation type.
    fn alloc_f32(&self, rows: usize, cols: usize) -> Result<Self::Tensor>;
    /// A lookup table kept in f32 (the RoPE cos and sin tables), not a weight.
    fn upload_table(&self, t: &HostTensor) -> Result<Self::Weight>;
    fn alloc_kv_cache(&self, slots: usize, max_seq: usize, kv_heads: usize, head_dim: usize) -> Result<Self::KvCache>;
    fn to_host(&self, x: &Self::Tensor) -> Result<Vec<f32>>;
    /// Waits for all work enqueued so far (for timing).
    fn sync(&self) -> Result<()>;

    /// `out[t] = table[ids[t] - vocab_start]`, or zeros where the id is not in this shard.
    fn embedding(&self, ids: &[u32], table: &Self::Weight, vocab_start: usize, out: &mut Self::Tensor) -> Result<()>;
    /// `out[m, n] = sum_k x[m, k] * w[n, k]`.
    fn matmul(&self, x: &Self::Tensor, w: &Self::Weight, out: &mut Self::Tensor) -> Result<()>;
    fn rms_norm(&self, x: &Self::Tensor, w: &Self::Weight, eps: f32, out: &mut Self::Tensor) -> Result<()>;
    /// `residual += delta; out = rms_norm(residual) * w`.
    fn add_rms_norm(
        &self,
        residual: &mut Self::Tensor,
        delta: &Self::Tensor,
        w: &Self::Weight,
        eps: f32,
        out: &mut Self::Tensor,
    ) -> Result<()>;
    /// `acc += x`.
    fn add(&self, acc: &mut Self::Tensor, x: &Self::Tensor) -> Result<()>;
    /// Rotates the q and k heads of `qkv` in place (HF half-split pairs); `cos`/`sin` are
    /// `[max_positions, head_dim / 2]` f32 tables.
    fn rope(
        &self,
        qkv: &mut Self::Tensor,
        layout: QkvLayout,
        batch: &StepBatch,
        cos: &Self::Weight,
        sin: &Self::Weight,
    ) -> Result<()>;
    /// Stores the k and v heads of `qkv` at their slots and positions.
    fn write_kv(
        &self,
        qkv: &Self::Tensor,
        layout: QkvLayout,
        batch: &StepBatch,
        cache: &mut Self::KvCache,
    ) -> Result<()>;
    /// `rope` then `write_kv`, which a backend may fuse.
    fn rope_write_kv(
        &self,
        qkv: &mut Self::Tensor,
        layout: QkvLayout,
        batch: &StepBatch,
        cos: &Self::Weight,
        sin: &Self::Weight,
        cache: &mut Self::KvCache,
    ) -> Result<()> {
        self.rope(qkv, layout, batch, cos, sin)?;
        self.write_kv(qkv, layout, batch, cache)
    }
    /// Causal attention of each new token over its sequence's cache up to its own position
    /// (the new tokens' K and V are already written). `out` is `[tokens, q_heads * head_dim]`.
    fn attention(
        &self,
        qkv: &Self::Tensor,
        layout: QkvLayout,
        batch: &StepBatch,
        cache: &Self::KvCache,
        out: &mut Self::Tensor,
    ) -> Result<()>;
    /// `gate_up` is `[rows, 2 i]` (gate columns, then up); `out[r, j] = silu(gate) * up`.
    fn silu_mul(&self, gate_up: &Self::Tensor, out: &mut Self::Tensor) -> Result<()>;
    /// `out = silu_mul(gate_up) w^T`: the MLP's activation and down projection, which a
    /// backend may fuse.
    fn silu_mul_matmul(&self, gate_up: &Self::Tensor, w: &Self::Weight, out: &mut Self::Tensor) -> Result<()>;
    /// `out[i] = x[rows[i]]`.
    fn select_rows(&self, x: &Self::Tensor, rows: &[usize], out: &mut Self::Tensor) -> Result<()>;

    /// In-place sum over the TP group.
    fn all_reduce(&self, x: &mut Self::Tensor) -> Result<()>;
    /// `out = [x of tp rank 0 | x of tp rank 1 | ...]` along columns.
    fn all_gather_cols(&self, x: &Self::Tensor, out: &mut Self::Tensor) -> Result<()>;
    /// PP: send to the next stage / receive from the previous one (same TP rank).
    fn send_next(&self, x: &Self::Tensor) -> Result<()>;
    fn recv_prev(&self, x: &mut Self::Tensor) -> Result<()>;

    /// Takes the step's inputs before its ops are enqueued (a device backend uploads them to
    /// the fixed buffers its ops and graphs read).
    fn begin_step(&self, inputs: &StepInputs) -> Result<()>;
    /// Enqueues sampling of one token per row of `logits` (`[seqs, >= vocab]`), row i with the
    /// step's key and counter of sequence i.
    fn sample(&self, logits: &Self::Tensor, vocab: usize, params: &SamplingParams) -> Result<()>;
    /// The `n` tokens of the last `sample`, on the host (waits for them).
    fn sampled_tokens(&self, n: usize) -> Result<Vec<u32>>;

    /// Microseconds per TP all-reduce of `elems` activations, timed as the decode step runs
    /// them (back to back, in a graph where the backend has graphs); a collective: every TP rank
    /// calls it. None where there is nothing to time (one rank, or no device timer).
    fn time_all_reduce(&self, _elems: usize) -> Result<Option<f64>> {
        Ok(None)
    }

    /// CUDA graphs, keyed by the caller (one per decode batch size). `graph_begin` starts
    /// capturing and returns false when the backend has no graphs; `graph_launch` replays a
    /// captured graph and returns false when there is none for `key`.
    fn graph_begin(&self, _key: u64) -> Result<bool> {
        Ok(false)
    }
    fn graph_end(&self, _key: u64) -> Result<()> {
        Ok(())
    }
    fn graph_launch(&self, _key: u64) -> Result<bool> {
        Ok(false)
    }
}

/// Stacks 2-D tensors of equal width (1-D tensors count as one row). Mixed storage is widened
/// to f32.
pub fn concat_rows(parts: Vec<HostTensor>) -> Result<HostTensor> {
    let width = |p: &HostTensor| if p.shape.len() == 1 { p.shape[0] } else { p.shape[1] };
    let cols = width(&parts[0]);
    if let Some(p) = parts.iter().find(|p| p.shape.len() > 2 || width(p) != cols) {
        return Err(Error::Invalid(format!(
            "cannot stack a tensor of shape {:?} under width {cols}",
            p.shape
        )));
    }
    if parts.len() == 1 {
        return Ok(parts.into_iter().next().unwrap());
    }
    let rows = parts
        .iter()
        .map(|p| if p.shape.len() == 1 { 1 } else { p.shape[0] })
        .sum();
    let data = if parts.iter().all(|p| matches!(p.data, HostData::Bf16(_))) {
        HostData::Bf16(
            parts
                .into_iter()
                .flat_map(|p| match p.data {
                    HostData::Bf16(v) => v,
                    HostData::F32(_) => unreachable!(),
                })
                .collect(),
        )
    } else {
        HostData::F32(parts.iter().flat_map(|p| p.to_f32()).collect())
    };
    Ok(HostTensor {
        shape: vec![rows, cols],
        data,
    })
}
