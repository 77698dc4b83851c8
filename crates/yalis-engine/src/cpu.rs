//! The CPU backend: plain f32 Rust, the numerical reference. Weights stored in bf16 on disk stay
//! bf16 in memory and are widened row by row.

use std::cell::RefCell;

use half::bf16;
use yalis_comm::HostComm;
use yalis_core::weights::{HostData, HostTensor};

use yalis_core::rng::Rng;
use yalis_core::sampling::{Sampler, SamplingParams};

use crate::backend::{Backend, QkvLayout, StepBatch, StepInputs};
use crate::{Error, Result};

/// A row-major f32 activation.
#[derive(Clone, Debug, PartialEq)]
pub struct CpuTensor {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl CpuTensor {
    fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }
    fn row_mut(&mut self, r: usize) -> &mut [f32] {
        &mut self.data[r * self.cols..(r + 1) * self.cols]
    }
}

#[derive(Debug)]
enum Storage {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
}

/// A weight `[rows, cols]` (1-D weights have one row).
#[derive(Debug)]
pub struct CpuWeight {
    rows: usize,
    cols: usize,
    data: Storage,
}

impl CpuWeight {
    /// Row `r` widened to f32 into `buf`.
    fn row_into<'a>(&'a self, r: usize, buf: &'a mut Vec<f32>) -> &'a [f32] {
        let range = r * self.cols..(r + 1) * self.cols;
        match &self.data {
            Storage::F32(v) => &v[range],
            Storage::Bf16(v) => {
                buf.clear();
                buf.extend(v[range].iter().map(|x| x.to_f32()));
                buf
            }
        }
    }

    fn vector(&self) -> Vec<f32> {
        let mut buf = Vec::new();
        self.row_into(0, &mut buf).to_vec()
    }
}

pub struct CpuKvCache {
    max_seq: usize,
    kv_heads: usize,
    head_dim: usize,
    k: Vec<f32>,
    v: Vec<f32>,
}

impl CpuKvCache {
    fn offset(&self, slot: usize, pos: usize) -> usize {
        (slot * self.max_seq + pos) * self.kv_heads * self.head_dim
    }
}

/// The CPU backend of one rank, with its TP and PP communicators.
pub struct CpuBackend {
    tp: Box<dyn HostComm>,
    pp: Box<dyn HostComm>,
    /// The step's per-sequence sampling keys and counters, and the last sampled tokens.
    sampling: RefCell<(Vec<u64>, Vec<u64>, Vec<u32>)>,
}

impl CpuBackend {
    pub fn new(tp: Box<dyn HostComm>, pp: Box<dyn HostComm>) -> Self {
        CpuBackend {
            tp,
            pp,
            sampling: RefCell::default(),
        }
    }
}

fn shape_err(op: &str, msg: String) -> Error {
    Error::Invalid(format!("cpu backend: {op}: {msg}"))
}

fn check(op: &str, ok: bool, msg: impl FnOnce() -> String) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(shape_err(op, msg()))
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight partial sums: vectorises, and is closer to a blocked GEMM's rounding than one chain.
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (ms + eps).sqrt();
    for ((o, v), g) in out.iter_mut().zip(x).zip(w) {
        *o = g * (v * inv);
    }
}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;
    type Weight = CpuWeight;
    type KvCache = CpuKvCache;

    fn describe(&self) -> String {
        "cpu (f32 reference)".into()
    }

    fn upload(&self, w: &HostTensor) -> Result<CpuWeight> {
        let (rows, cols) = match w.shape.as_slice() {
            [n] => (1, *n),
            [r, c] => (*r, *c),
            s => {
                return Err(shape_err(
                    "upload",
                    format!("expected a 1-D or 2-D tensor, got shape {s:?}"),
                ))
            }
        };
        let data = match &w.data {
            HostData::F32(v) => Storage::F32(v.clone()),
            HostData::Bf16(v) => Storage::Bf16(v.clone()),
        };
        Ok(CpuWeight { rows, cols, data })
    }

    fn alloc(&self, rows: usize, cols: usize) -> Result<CpuTensor> {
        Ok(CpuTensor {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        })
    }

    fn alloc_f32(&self, rows: usize, cols: usize) -> Result<CpuTensor> {
        self.alloc(rows, cols)
    }

    fn upload_table(&self, t: &HostTensor) -> Result<CpuWeight> {
        self.upload(t)
    }

    fn alloc_kv_cache(&self, slots: usize, max_seq: usize, kv_heads: usize, head_dim: usize) -> Result<CpuKvCache> {
        let n = slots * max_seq * kv_heads * head_dim;
        Ok(CpuKvCache {
            max_seq,
            kv_heads,
            head_dim,
            k: vec![0.0; n],
            v: vec![0.0; n],
        })
    }

    fn to_host(&self, x: &CpuTensor) -> Result<Vec<f32>> {
        Ok(x.data.clone())
    }

    fn sync(&self) -> Result<()> {
        Ok(())
    }

    fn embedding(&self, ids: &[u32], table: &CpuWeight, vocab_start: usize, out: &mut CpuTensor) -> Result<()> {
        check("embedding", out.rows == ids.len() && out.cols == table.cols, || {
            format!(
                "out [{}, {}] for {} ids and a table of width {}",
                out.rows,
                out.cols,
                ids.len(),
                table.cols
            )
        })?;
        let mut buf = Vec::new();
        for (t, &id) in ids.iter().enumerate() {
            let local = (id as usize).wrapping_sub(vocab_start);
            if local < table.rows {
                let row = table.row_into(local, &mut buf);
                out.row_mut(t).copy_from_slice(row);
            } else {
                out.row_mut(t).fill(0.0);
            }
        }
        Ok(())
    }

    fn matmul(&self, x: &CpuTensor, w: &CpuWeight, out: &mut CpuTensor) -> Result<()> {
        check(
            "matmul",
            x.cols == w.cols && out.rows == x.rows && out.cols == w.rows,
            || {
                format!(
                    "x [{}, {}] times w [{}, {}]^T into [{}, {}]",
                    x.rows, x.cols, w.rows, w.cols, out.rows, out.cols
                )
            },
        )?;
        let mut buf = Vec::new();
        for n in 0..w.rows {
            let wr = w.row_into(n, &mut buf);
            for m in 0..x.rows {
                out.data[m * out.cols + n] = dot(x.row(m), wr);
            }
        }
        Ok(())
    }

    fn rms_norm(&self, x: &CpuTensor, w: &CpuWeight, eps: f32, out: &mut CpuTensor) -> Result<()> {
        check(
            "rms_norm",
            x.cols == w.cols && out.rows == x.rows && out.cols == x.cols,
            || {
                format!(
                    "x [{}, {}], weight {}, out [{}, {}]",
                    x.rows, x.cols, w.cols, out.rows, out.cols
                )
            },
        )?;
        let g = w.vector();
        for r in 0..x.rows {
            rms_norm_row(x.row(r), &g, eps, out.row_mut(r));
        }
        Ok(())
    }

    fn add_rms_norm(
        &self,
        residual: &mut CpuTensor,
        delta: &CpuTensor,
        w: &CpuWeight,
        eps: f32,
        out: &mut CpuTensor,
    ) -> Result<()> {
        self.add(residual, delta)?;
        self.rms_norm(residual, w, eps, out)
    }

    fn add(&self, acc: &mut CpuTensor, x: &CpuTensor) -> Result<()> {
        check("add", acc.rows == x.rows && acc.cols == x.cols, || {
            format!("[{}, {}] += [{}, {}]", acc.rows, acc.cols, x.rows, x.cols)
        })?;
        acc.data.iter_mut().zip(&x.data).for_each(|(a, b)| *a += b);
        Ok(())
    }

    fn rope(
        &self,
        qkv: &mut CpuTensor,
        l: QkvLayout,
        batch: &StepBatch,
        cos: &CpuWeight,
        sin: &CpuWeight,
    ) -> Result<()> {
        let half = l.head_dim / 2;
        let positions = batch.positions();
        check(
            "rope",
            qkv.cols == l.width() && qkv.rows == positions.len() && cos.cols == half,
            || {
                format!(
                    "qkv [{}, {}] for layout {l:?}, {} positions, table width {}",
                    qkv.rows,
                    qkv.cols,
                    positions.len(),
                    cos.cols
                )
            },
        )?;
        let (mut cb, mut sb) = (Vec::new(), Vec::new());
        for (t, &pos) in positions.iter().enumerate() {
            check("rope", pos < cos.rows, || {
                format!("position {pos} is past the table's {} positions", cos.rows)
            })?;
            let (c, s) = (cos.row_into(pos, &mut cb), sin.row_into(pos, &mut sb));
            // q heads then k heads; v is not rotated.
            for head in qkv.row_mut(t)[..(l.q_heads + l.kv_heads) * l.head_dim].chunks_exact_mut(l.head_dim) {
                let (x1, x2) = head.split_at_mut(half);
                for i in 0..half {
                    let (a, b) = (x1[i], x2[i]);
                    x1[i] = a * c[i] - b * s[i];
                    x2[i] = b * c[i] + a * s[i];
                }
            }
        }
        Ok(())
    }

    fn write_kv(&self, qkv: &CpuTensor, l: QkvLayout, batch: &StepBatch, cache: &mut CpuKvCache) -> Result<()> {
        let kv_w = l.kv_heads * l.head_dim;
        let q_w = l.q_heads * l.head_dim;
        check(
            "write_kv",
            kv_w == cache.kv_heads * cache.head_dim && qkv.cols == l.width(),
            || {
                format!(
                    "layout {l:?} against a cache of {} heads x {}",
                    cache.kv_heads, cache.head_dim
                )
            },
        )?;
        let mut t = 0;
        for s in &batch.seqs {
            check(
                "write_kv",
                s.start_pos + s.len <= cache.max_seq && cache.offset(s.slot + 1, 0) <= cache.k.len(),
                || {
                    format!(
                        "slot {} positions {}..{} exceed the cache ({} positions)",
                        s.slot,
                        s.start_pos,
                        s.start_pos + s.len,
                        cache.max_seq
                    )
                },
            )?;
            for p in s.start_pos..s.start_pos + s.len {
                let off = cache.offset(s.slot, p);
                let row = qkv.row(t);
                cache.k[off..off + kv_w].copy_from_slice(&row[q_w..q_w + kv_w]);
                cache.v[off..off + kv_w].copy_from_slice(&row[q_w + kv_w..]);
                t += 1;
            }
        }
        Ok(())
    }

    fn attention(
        &self,
        qkv: &CpuTensor,
        l: QkvLayout,
        batch: &StepBatch,
        cache: &CpuKvCache,
        out: &mut CpuTensor,
    ) -> Result<()> {
        let (hd, group) = (l.head_dim, l.q_heads / l.kv_heads);
        check(
            "attention",
            out.cols == l.q_heads * hd && out.rows == qkv.rows && qkv.rows == batch.num_tokens(),
            || {
                format!(
                    "out [{}, {}] for {} tokens of layout {l:?}",
                    out.rows,
                    out.cols,
                    batch.num_tokens()
                )
            },
        )?;
        let scale = 1.0 / (hd as f32).sqrt();
        let mut scores = Vec::new();
        let mut t = 0;
        for s in &batch.seqs {
            for p in s.start_pos..s.start_pos + s.len {
                let q_row = &qkv.row(t)[..l.q_heads * hd];
                for h in 0..l.q_heads {
                    let kvh = h / group;
                    let q = &q_row[h * hd..(h + 1) * hd];
                    scores.clear();
                    scores.extend((0..=p).map(|j| {
                        let off = cache.offset(s.slot, j) + kvh * hd;
                        dot(q, &cache.k[off..off + hd]) * scale
                    }));
                    let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                    let mut denom = 0.0;
                    for x in scores.iter_mut() {
                        *x = (*x - max).exp();
                        denom += *x;
                    }
                    let o = &mut out.data[t * out.cols + h * hd..t * out.cols + (h + 1) * hd];
                    o.fill(0.0);
                    for (j, w) in scores.iter().enumerate() {
                        let off = cache.offset(s.slot, j) + kvh * hd;
                        for (oi, vi) in o.iter_mut().zip(&cache.v[off..off + hd]) {
                            *oi += w / denom * vi;
                        }
                    }
                }
                t += 1;
            }
        }
        Ok(())
    }

    fn silu_mul(&self, gate_up: &CpuTensor, out: &mut CpuTensor) -> Result<()> {
        let i = out.cols;
        check("silu_mul", gate_up.cols == 2 * i && gate_up.rows == out.rows, || {
            format!("[{}, {}] into [{}, {}]", gate_up.rows, gate_up.cols, out.rows, out.cols)
        })?;
        for r in 0..out.rows {
            let (g, u) = gate_up.row(r).split_at(i);
            for ((o, g), u) in out.row_mut(r).iter_mut().zip(g).zip(u) {
                *o = g / (1.0 + (-g).exp()) * u;
            }
        }
        Ok(())
    }

    fn silu_mul_matmul(&self, gate_up: &CpuTensor, w: &CpuWeight, out: &mut CpuTensor) -> Result<()> {
        let mut act = self.alloc(gate_up.rows, gate_up.cols / 2)?;
        self.silu_mul(gate_up, &mut act)?;
        self.matmul(&act, w, out)
    }

    fn select_rows(&self, x: &CpuTensor, rows: &[usize], out: &mut CpuTensor) -> Result<()> {
        check(
            "select_rows",
            out.rows == rows.len() && out.cols == x.cols && rows.iter().all(|&r| r < x.rows),
            || {
                format!(
                    "rows {rows:?} of [{}, {}] into [{}, {}]",
                    x.rows, x.cols, out.rows, out.cols
                )
            },
        )?;
        for (i, &r) in rows.iter().enumerate() {
            out.row_mut(i).copy_from_slice(x.row(r));
        }
        Ok(())
    }

    fn all_reduce(&self, x: &mut CpuTensor) -> Result<()> {
        Ok(self.tp.all_reduce_sum(&mut x.data)?)
    }

    fn all_gather_cols(&self, x: &CpuTensor, out: &mut CpuTensor) -> Result<()> {
        let n = self.tp.size();
        check("all_gather_cols", out.rows == x.rows && out.cols == x.cols * n, || {
            format!(
                "[{}, {}] from {n} ranks into [{}, {}]",
                x.rows, x.cols, out.rows, out.cols
            )
        })?;
        let mut gathered = vec![0.0; x.data.len() * n];
        self.tp.all_gather(&x.data, &mut gathered)?;
        for (rank, part) in gathered.chunks_exact(x.data.len().max(1)).enumerate() {
            for r in 0..x.rows {
                let dst = r * out.cols + rank * x.cols;
                out.data[dst..dst + x.cols].copy_from_slice(&part[r * x.cols..(r + 1) * x.cols]);
            }
        }
        Ok(())
    }

    fn send_next(&self, x: &CpuTensor) -> Result<()> {
        Ok(self.pp.send(&x.data, self.pp.rank() + 1)?)
    }

    fn begin_step(&self, inputs: &StepInputs) -> Result<()> {
        let mut s = self.sampling.borrow_mut();
        s.0 = inputs.sample_keys.to_vec();
        s.1 = inputs.sample_counters.to_vec();
        Ok(())
    }

    fn sample(&self, logits: &CpuTensor, vocab: usize, params: &SamplingParams) -> Result<()> {
        let mut s = self.sampling.borrow_mut();
        check("sample", logits.cols >= vocab && s.0.len() == logits.rows, || {
            format!(
                "[{}, {}] logits, vocab {vocab}, {} sampling keys",
                logits.rows,
                logits.cols,
                s.0.len()
            )
        })?;
        let tokens = (0..logits.rows)
            .map(|r| Sampler::with_rng(*params, Rng::at(s.0[r], s.1[r])).sample(&logits.row(r)[..vocab]))
            .collect();
        s.2 = tokens;
        Ok(())
    }

    fn sampled_tokens(&self, n: usize) -> Result<Vec<u32>> {
        let s = self.sampling.borrow();
        check("sampled_tokens", s.2.len() == n, || {
            format!("{n} tokens asked, {} sampled", s.2.len())
        })?;
        Ok(s.2.clone())
    }

    fn recv_prev(&self, x: &mut CpuTensor) -> Result<()> {
        let prev = self
            .pp
            .rank()
            .checked_sub(1)
            .ok_or_else(|| shape_err("recv_prev", "the first stage has no previous stage".into()))?;
        Ok(self.pp.recv(&mut x.data, prev)?)
    }
}
