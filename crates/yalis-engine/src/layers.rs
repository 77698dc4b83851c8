//! Parallel layer types. Each loads its own shard of the checkpoint; only the row-parallel
//! layer, the vocab-parallel embedding and the LM head touch the communicator.

use std::ops::Range;

use yalis_core::weights::{HostData, HostTensor, Slice, WeightSource};

use crate::backend::Backend;
use crate::{Error, Result};

/// One piece of a fused column-parallel weight: rows `rows` of tensor `name`, whose full shape
/// is `[full_rows, in_features]`.
pub struct Piece<'a> {
    pub name: &'a str,
    pub full_rows: usize,
    pub rows: Range<usize>,
}

/// `y = x W^T` with W's output rows split across TP ranks; several HF tensors may be fused
/// into one weight (Q|K|V, gate|up). No communication.
pub struct ColumnParallelLinear<B: Backend> {
    pub weight: B::Weight,
    pub out_per_rank: usize,
}

impl<B: Backend> ColumnParallelLinear<B> {
    pub fn load(b: &B, src: &dyn WeightSource, pieces: &[Piece], in_features: usize) -> Result<Self> {
        let parts = pieces
            .iter()
            .map(|p| src.load(p.name, &[p.full_rows, in_features], Slice::Rows(p.rows.clone())))
            .collect::<yalis_core::Result<Vec<_>>>()?;
        let fused = concat_rows(parts)?;
        Ok(ColumnParallelLinear {
            out_per_rank: fused.shape[0],
            weight: b.upload(&fused)?,
        })
    }

    pub fn forward(&self, b: &B, x: &B::Tensor, out: &mut B::Tensor) -> Result<()> {
        b.matmul(x, &self.weight, out)
    }
}

/// `y = all_reduce(x_shard W_shard^T)` with W's input columns split across TP ranks.
pub struct RowParallelLinear<B: Backend> {
    pub weight: B::Weight,
}

impl<B: Backend> RowParallelLinear<B> {
    pub fn load(b: &B, src: &dyn WeightSource, name: &str, shape: [usize; 2], cols: Range<usize>) -> Result<Self> {
        let w = src.load(name, &shape, Slice::Cols(cols))?;
        Ok(RowParallelLinear { weight: b.upload(&w)? })
    }

    pub fn forward(&self, b: &B, x: &B::Tensor, out: &mut B::Tensor) -> Result<()> {
        b.matmul(x, &self.weight, out)?;
        b.all_reduce(out)
    }
}

/// Embedding rows split by vocab range; ids outside a rank's range give zeros there, and the
/// all-reduce assembles the full rows.
pub struct VocabParallelEmbedding<B: Backend> {
    pub table: B::Weight,
    pub vocab_start: usize,
}

impl<B: Backend> VocabParallelEmbedding<B> {
    pub fn forward(&self, b: &B, ids: &[u32], out: &mut B::Tensor) -> Result<()> {
        b.embedding(ids, &self.table, self.vocab_start, out)?;
        b.all_reduce(out)
    }
}

/// LM head split by vocab rows, each shard padded to the same size with zero rows; the logits
/// are gathered so every TP rank holds all `vocab_per_rank * tp` columns (the first
/// `vocab_size` are real).
pub struct ParallelLmHead<B: Backend> {
    pub weight: B::Weight,
    pub vocab_per_rank: usize,
}

impl<B: Backend> ParallelLmHead<B> {
    /// `x` is `[seqs, hidden]`; returns `[seqs, vocab_per_rank * tp]`.
    pub fn forward(&self, b: &B, x: &B::Tensor, rows: usize, tp: usize) -> Result<B::Tensor> {
        let mut local = b.alloc(rows, self.vocab_per_rank)?;
        b.matmul(x, &self.weight, &mut local)?;
        if tp == 1 {
            return Ok(local);
        }
        let mut all = b.alloc(rows, self.vocab_per_rank * tp)?;
        b.all_gather_cols(&local, &mut all)?;
        Ok(all)
    }
}

/// Loads rows `rows` of a `[vocab, hidden]` table, padded with zero rows to `padded_rows`.
pub fn load_vocab_shard(
    src: &dyn WeightSource,
    name: &str,
    shape: [usize; 2],
    rows: Range<usize>,
    padded_rows: usize,
) -> Result<HostTensor> {
    let t = src.load(name, &shape, Slice::Rows(rows))?;
    let missing = padded_rows - t.shape[0];
    if missing == 0 {
        return Ok(t);
    }
    let zero = HostTensor {
        shape: vec![missing, shape[1]],
        data: match t.data {
            HostData::F32(_) => HostData::F32(vec![0.0; missing * shape[1]]),
            HostData::Bf16(_) => HostData::Bf16(vec![half::bf16::ZERO; missing * shape[1]]),
        },
    };
    concat_rows(vec![t, zero])
}

/// Stacks 2-D tensors of equal width. Mixed storage is widened to f32.
pub fn concat_rows(parts: Vec<HostTensor>) -> Result<HostTensor> {
    let cols = parts[0].shape[1];
    if let Some(p) = parts.iter().find(|p| p.shape.len() != 2 || p.shape[1] != cols) {
        return Err(Error::Invalid(format!(
            "cannot stack a tensor of shape {:?} under width {cols}",
            p.shape
        )));
    }
    let rows = parts.iter().map(|p| p.shape[0]).sum();
    if parts.len() == 1 {
        return Ok(parts.into_iter().next().unwrap());
    }
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
