//! Parallel layer types. Each loads its own shard of the checkpoint; only the row-parallel
//! layer, the vocab-parallel embedding and the LM head touch the communicator.

use std::ops::Range;

use yalis_core::weights::{Slice, WeightSource};

use crate::backend::{Backend, WeightPiece};
use crate::Result;

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
}

impl<B: Backend> ColumnParallelLinear<B> {
    pub fn load(b: &B, src: &dyn WeightSource, pieces: &[Piece], in_features: usize) -> Result<Self> {
        let pieces: Vec<WeightPiece> = pieces
            .iter()
            .map(|p| WeightPiece {
                name: p.name,
                shape: vec![p.full_rows, in_features],
                slice: Slice::Rows(p.rows.clone()),
            })
            .collect();
        Ok(ColumnParallelLinear {
            weight: b.load_weight(src, &pieces, None)?,
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
        let piece = WeightPiece {
            name,
            shape: shape.to_vec(),
            slice: Slice::Cols(cols),
        };
        Ok(RowParallelLinear {
            weight: b.load_weight(src, &[piece], None)?,
        })
    }

    pub fn forward(&self, b: &B, x: &B::Tensor, out: &mut B::Tensor) -> Result<()> {
        b.matmul(x, &self.weight, out)?;
        b.all_reduce(out)
    }

    /// The same on `silu(gate) * up` of a fused gate|up activation (the MLP's down projection).
    pub fn forward_silu(&self, b: &B, gate_up: &B::Tensor, out: &mut B::Tensor) -> Result<()> {
        b.silu_mul_matmul(gate_up, &self.weight, out)?;
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

/// LM head: either split by vocab rows, each shard padded to the same size with zero rows and
/// the logits gathered so every TP rank holds all `vocab_per_rank * tp` columns, or replicated
/// (every rank holds all rows and computes all logits, no communication). The first
/// `vocab_size` columns are real.
pub struct ParallelLmHead<B: Backend> {
    pub weight: B::Weight,
    /// Rows of `weight` (the padded shard, or the whole vocab).
    pub rows: usize,
    /// Gather the shards' logits over the TP group.
    pub gather: bool,
}

impl<B: Backend> ParallelLmHead<B> {
    /// `x` is `[seqs, hidden]`; returns `[seqs, >= vocab_size]` logits.
    pub fn forward(&self, b: &B, x: &B::Tensor, seqs: usize, tp: usize) -> Result<B::Tensor> {
        let mut local = b.alloc_f32(seqs, self.rows)?;
        b.matmul(x, &self.weight, &mut local)?;
        if !self.gather {
            return Ok(local);
        }
        let mut all = b.alloc_f32(seqs, self.rows * tp)?;
        b.all_gather_cols(&local, &mut all)?;
        Ok(all)
    }
}
