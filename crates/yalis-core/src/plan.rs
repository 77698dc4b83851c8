//! The parallel plan: which shard of every tensor each rank owns, and what that costs in memory.
//!
//! Ranks are laid out stage-major: `rank = pp_stage * tp + tp_rank`, so a TP group is a block of
//! consecutive ranks (the GPUs of one node, when TP fits in a node).

use std::fmt::Write as _;
use std::ops::Range;

use crate::config::ModelConfig;
use crate::error::{Error, Result};

#[derive(Clone, Debug)]
pub struct ParallelPlan {
    pub tp: usize,
    pub pp: usize,
    pub ranks: Vec<RankPlan>,
}

/// One rank's shards. Global counts are the config's; `*_per_rank` are this rank's.
#[derive(Clone, Debug, PartialEq)]
pub struct RankPlan {
    pub rank: usize,
    pub tp: usize,
    pub pp: usize,
    pub tp_rank: usize,
    pub pp_stage: usize,
    /// Decoder layers this stage runs (global indices).
    pub layers: Range<usize>,
    pub head_dim: usize,
    /// Query heads `[q_head_start, q_head_start + num_heads_per_rank)`.
    pub q_head_start: usize,
    pub num_heads_per_rank: usize,
    /// KV heads `[kv_head_start, kv_head_start + num_kv_heads_per_rank)`; when TP exceeds the
    /// KV heads, each KV head is replicated on `tp / num_key_value_heads` ranks.
    pub kv_head_start: usize,
    pub num_kv_heads_per_rank: usize,
    /// MLP columns `[intermediate_start, intermediate_start + intermediate_per_rank)`.
    pub intermediate_start: usize,
    pub intermediate_per_rank: usize,
    /// Vocab rows `[vocab_start, vocab_end)`; every shard is padded to `vocab_per_rank` rows so
    /// all ranks gather equal pieces (`vocab_per_rank * tp >= vocab_size`).
    pub vocab_start: usize,
    pub vocab_end: usize,
    pub vocab_per_rank: usize,
    /// LM-head rows this rank holds (last stage): its vocab shard, or every row when the head
    /// is replicated; padded with zero rows to `lm_head_padded`.
    pub lm_head: Range<usize>,
    pub lm_head_padded: usize,
    /// Every TP rank computes all logits (no gather) instead of its vocab shard.
    pub lm_head_replicated: bool,
}

impl RankPlan {
    pub fn is_first_stage(&self) -> bool {
        self.pp_stage == 0
    }
    pub fn is_last_stage(&self) -> bool {
        self.pp_stage + 1 == self.pp
    }
    /// Width of this rank's fused QKV projection output.
    pub fn qkv_width(&self) -> usize {
        (self.num_heads_per_rank + 2 * self.num_kv_heads_per_rank) * self.head_dim
    }
}

/// What to size memory for.
#[derive(Clone, Copy, Debug)]
pub struct MemoryParams {
    /// Bytes per stored weight and KV element (2 for bf16).
    pub dtype_bytes: u64,
    pub batch_size: usize,
    /// Longest sequence (prompt + generated) the KV cache holds.
    pub max_seq_len: usize,
}

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct MemoryEstimate {
    pub weights: u64,
    pub kv_cache: u64,
    pub workspace: u64,
}

impl MemoryEstimate {
    pub fn total(&self) -> u64 {
        self.weights + self.kv_cache + self.workspace
    }
}

impl ParallelPlan {
    pub fn new(cfg: &ModelConfig, tp: usize, pp: usize) -> Result<Self> {
        let err = |m: String| Err(Error::Plan(m));
        if tp == 0 || pp == 0 {
            return err(format!("tp={tp} and pp={pp} must both be at least 1"));
        }
        let heads = cfg.num_attention_heads;
        let kv = cfg.num_key_value_heads;
        if !heads.is_multiple_of(tp) {
            return err(format!("tp={tp} does not divide num_attention_heads={heads}"));
        }
        if tp <= kv && !kv.is_multiple_of(tp) {
            return err(format!(
                "tp={tp} does not divide num_key_value_heads={kv} (use a tp that divides {kv}, or a multiple of it)"
            ));
        }
        if tp > kv && !tp.is_multiple_of(kv) {
            return err(format!(
                "tp={tp} exceeds num_key_value_heads={kv} but is not a multiple of it, so KV heads cannot be replicated evenly"
            ));
        }
        if !cfg.intermediate_size.is_multiple_of(tp) {
            return err(format!(
                "tp={tp} does not divide intermediate_size={}",
                cfg.intermediate_size
            ));
        }
        let layers = cfg.num_hidden_layers;
        if pp > layers {
            return err(format!(
                "pp={pp} exceeds num_hidden_layers={layers}: every stage needs a layer"
            ));
        }
        let heads_per_rank = heads / tp;
        let kv_per_rank = if tp <= kv { kv / tp } else { 1 };
        let inter_per_rank = cfg.intermediate_size / tp;
        let vocab_per_rank = cfg.vocab_size.div_ceil(tp);
        let mut ranks = Vec::with_capacity(tp * pp);
        for stage in 0..pp {
            let layer_range = stage_layers(layers, pp, stage);
            for t in 0..tp {
                let vocab_start = (t * vocab_per_rank).min(cfg.vocab_size);
                ranks.push(RankPlan {
                    rank: stage * tp + t,
                    tp,
                    pp,
                    tp_rank: t,
                    pp_stage: stage,
                    layers: layer_range.clone(),
                    head_dim: cfg.head_dim,
                    q_head_start: t * heads_per_rank,
                    num_heads_per_rank: heads_per_rank,
                    kv_head_start: if tp <= kv { t * kv_per_rank } else { t / (tp / kv) },
                    num_kv_heads_per_rank: kv_per_rank,
                    intermediate_start: t * inter_per_rank,
                    intermediate_per_rank: inter_per_rank,
                    vocab_start,
                    vocab_end: (vocab_start + vocab_per_rank).min(cfg.vocab_size),
                    vocab_per_rank,
                    lm_head: vocab_start..(vocab_start + vocab_per_rank).min(cfg.vocab_size),
                    lm_head_padded: vocab_per_rank,
                    lm_head_replicated: false,
                });
            }
        }
        Ok(ParallelPlan { tp, pp, ranks })
    }

    /// Every TP rank holds the whole LM head and computes all logits, instead of a vocab shard
    /// and an all-gather.
    pub fn with_replicated_lm_head(mut self, cfg: &ModelConfig) -> Self {
        for r in &mut self.ranks {
            r.lm_head = 0..cfg.vocab_size;
            r.lm_head_padded = cfg.vocab_size;
            r.lm_head_replicated = true;
        }
        self
    }

    pub fn world_size(&self) -> usize {
        self.tp * self.pp
    }

    /// Memory one rank needs, in bytes.
    pub fn memory(&self, cfg: &ModelConfig, rank: usize, p: MemoryParams) -> MemoryEstimate {
        let r = &self.ranks[rank];
        let h = cfg.hidden_size as u64;
        let b = p.dtype_bytes;
        let layers = r.layers.len() as u64;
        let q = (r.num_heads_per_rank * r.head_dim) as u64;
        let kv = (r.num_kv_heads_per_rank * r.head_dim) as u64;
        let inter = r.intermediate_per_rank as u64;
        let per_layer = h * (q + 2 * kv) + q * h + 3 * h * inter + 2 * h;
        let vocab_shard = r.vocab_per_rank as u64 * h;
        let mut weights = layers * per_layer;
        if r.is_first_stage() {
            weights += vocab_shard;
        }
        if r.is_last_stage() {
            weights += h; // final norm
            if !(cfg.tie_word_embeddings && r.is_first_stage() && !r.lm_head_replicated) {
                weights += r.lm_head_padded as u64 * h;
            }
        }
        let tokens = (p.batch_size * p.max_seq_len) as u64;
        let kv_cache = 2 * layers * tokens * kv * b;
        // Activations of the largest step (a prefill of every prompt at once): residual, normed
        // input, qkv, attention out, gate|up, silu out, plus f32 logits of the last tokens.
        let act = tokens * (3 * h + q + 2 * kv + q + 3 * inter) * b;
        let logits = p.batch_size as u64 * (r.vocab_per_rank * r.tp) as u64 * 4 * 2;
        MemoryEstimate {
            weights: weights * b,
            kv_cache,
            workspace: act + logits,
        }
    }

    /// A table of each rank's shards and memory; with `capacity` (bytes per device) it says
    /// whether each rank fits.
    pub fn describe(&self, cfg: &ModelConfig, p: MemoryParams, capacity: Option<u64>) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:>4} {:>3} {:>3} {:>9} {:>9} {:>9} {:>13} {:>15} {:>10} {:>10} {:>10} {:>10}  fits",
            "rank",
            "pp",
            "tp",
            "layers",
            "q heads",
            "kv heads",
            "intermediate",
            "vocab rows",
            "weights",
            "kv cache",
            "workspace",
            "total"
        );
        for r in &self.ranks {
            let m = self.memory(cfg, r.rank, p);
            let fits = match capacity {
                Some(c) if m.total() <= c => "yes",
                Some(_) => "NO",
                None => "-",
            };
            let _ = writeln!(
                s,
                "{:>4} {:>3} {:>3} {:>9} {:>9} {:>9} {:>13} {:>15} {:>10} {:>10} {:>10} {:>10}  {}",
                r.rank,
                r.pp_stage,
                r.tp_rank,
                format!("{}..{}", r.layers.start, r.layers.end),
                format!("{}+{}", r.q_head_start, r.num_heads_per_rank),
                format!("{}+{}", r.kv_head_start, r.num_kv_heads_per_rank),
                format!("{}+{}", r.intermediate_start, r.intermediate_per_rank),
                format!("{}..{}", r.vocab_start, r.vocab_end),
                fmt_bytes(m.weights),
                fmt_bytes(m.kv_cache),
                fmt_bytes(m.workspace),
                fmt_bytes(m.total()),
                fits
            );
        }
        s
    }

    /// Checks that every rank fits in `capacity` bytes; the error names the largest rank and
    /// the numbers.
    pub fn check_fits(&self, cfg: &ModelConfig, p: MemoryParams, capacity: u64) -> Result<()> {
        let (rank, m) = (0..self.world_size())
            .rev() // the first of equals: max_by_key keeps the last
            .map(|r| (r, self.memory(cfg, r, p)))
            .max_by_key(|(_, m)| m.total())
            .expect("a plan has at least one rank");
        if m.total() > capacity {
            return Err(Error::Plan(format!(
                "does not fit: rank {rank} needs {} (weights {}, KV cache {}, workspace {}) but a device holds {}; \
                 raise --tp or --pp, or lower --batch-size or the sequence length",
                fmt_bytes(m.total()),
                fmt_bytes(m.weights),
                fmt_bytes(m.kv_cache),
                fmt_bytes(m.workspace),
                fmt_bytes(capacity)
            )));
        }
        Ok(())
    }
}

/// Layers of stage `stage` when `layers` are split over `pp` stages as evenly as possible (the
/// first `layers % pp` stages take one more).
pub fn stage_layers(layers: usize, pp: usize, stage: usize) -> Range<usize> {
    let base = layers / pp;
    let extra = layers % pp;
    let start = stage * base + stage.min(extra);
    let len = base + usize::from(stage < extra);
    start..start + len
}

/// "1.50 GiB"-style sizes.
pub fn fmt_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

/// Parses "141GB", "80GiB", "512MB", "1.5TB" or a plain byte count.
pub fn parse_bytes(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| Error::Invalid(format!("'{s}' is not a size: write e.g. 141GB, 80GiB or 512MiB")))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" | "k" => 1e3,
        "mb" | "m" => 1e6,
        "gb" | "g" => 1e9,
        "tb" | "t" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024f64.powi(2),
        "gib" => 1024f64.powi(3),
        "tib" => 1024f64.powi(4),
        u => {
            return Err(Error::Invalid(format!(
                "'{s}': unknown unit '{u}' (use B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
            )))
        }
    };
    if !v.is_finite() || v < 0.0 {
        return Err(Error::Invalid(format!("'{s}' is not a size")));
    }
    Ok((v * mult) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ResolvedModel;

    fn cfg(name: &str) -> ModelConfig {
        ResolvedModel::resolve(name).unwrap().config
    }

    #[test]
    fn llama405b_tp16_replicates_kv_heads() {
        let c = cfg("llama-405b");
        let plan = ParallelPlan::new(&c, 16, 2).unwrap();
        assert_eq!(plan.world_size(), 32);
        let r = &plan.ranks[16 + 5];
        assert_eq!((r.pp_stage, r.tp_rank, r.layers.clone()), (1, 5, 63..126));
        assert_eq!((r.num_heads_per_rank, r.num_kv_heads_per_rank), (8, 1));
        // Ranks 4 and 5 share KV head 2; q heads 40..48 belong to it (16 q heads per KV head).
        assert_eq!(r.kv_head_start, 2);
        assert_eq!(plan.ranks[4].kv_head_start, 2);
        assert_eq!(r.q_head_start / (c.num_attention_heads / c.num_key_value_heads), 2);
        assert_eq!(r.vocab_per_rank * 16, 128256);
    }

    #[test]
    fn every_q_head_maps_to_its_kv_head() {
        let c = cfg("llama-70b");
        for tp in [1, 2, 4, 8, 16, 32, 64] {
            let plan = ParallelPlan::new(&c, tp, 1).unwrap();
            let group = c.num_attention_heads / c.num_key_value_heads;
            let mut covered = vec![0; c.num_attention_heads];
            for r in &plan.ranks {
                for (q, c) in covered
                    .iter_mut()
                    .enumerate()
                    .skip(r.q_head_start)
                    .take(r.num_heads_per_rank)
                {
                    *c += 1;
                    let kv = q / group;
                    assert!(kv >= r.kv_head_start && kv < r.kv_head_start + r.num_kv_heads_per_rank);
                }
            }
            assert!(covered.iter().all(|&n| n == 1));
        }
    }

    #[test]
    fn uneven_vocab_and_layers() {
        let mut c = cfg("tiny");
        c.vocab_size = 333;
        c.num_hidden_layers = 7;
        let plan = ParallelPlan::new(&c, 4, 3).unwrap();
        let v: Vec<_> = plan.ranks[..4].iter().map(|r| (r.vocab_start, r.vocab_end)).collect();
        assert_eq!(v, vec![(0, 84), (84, 168), (168, 252), (252, 333)]);
        let l: Vec<_> = (0..3).map(|s| plan.ranks[s * 4].layers.clone()).collect();
        assert_eq!(l, vec![0..3, 3..5, 5..7]);
    }

    #[test]
    fn errors_name_the_numbers() {
        let c = cfg("llama-70b");
        let e = ParallelPlan::new(&c, 3, 1).unwrap_err().to_string();
        assert!(e.contains("tp=3 does not divide num_attention_heads=64"), "{e}");
        let e = ParallelPlan::new(&c, 1, 81).unwrap_err().to_string();
        assert!(e.contains("pp=81 exceeds num_hidden_layers=80"), "{e}");
        let e = ParallelPlan::new(&c, 0, 1).unwrap_err().to_string();
        assert!(e.contains("tp=0"), "{e}");
        let mut c2 = c.clone();
        c2.num_key_value_heads = 16;
        c2.num_attention_heads = 48;
        let e = ParallelPlan::new(&c2, 12, 1).unwrap_err().to_string();
        assert!(e.contains("num_key_value_heads=16"), "{e}");
    }

    #[test]
    fn memory_and_fit() {
        let c = cfg("llama-405b");
        let p = MemoryParams {
            dtype_bytes: 2,
            batch_size: 1,
            max_seq_len: 2048,
        };
        let plan = ParallelPlan::new(&c, 8, 1).unwrap();
        let m = plan.memory(&c, 0, p);
        // 405.8e9 params * 2 bytes / 8 ranks ~ 101 GB of weights per rank.
        assert!((m.weights as f64 / 1e9 - 101.5).abs() < 1.0, "{}", m.weights);
        plan.check_fits(&c, p, parse_bytes("141GB").unwrap()).unwrap();
        let plan4 = ParallelPlan::new(&c, 4, 1).unwrap();
        let e = plan4
            .check_fits(&c, p, parse_bytes("141GB").unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not fit") && e.contains("rank 0"), "{e}");
        let sum: u64 = (0..8).map(|r| plan.memory(&c, r, p).weights).sum();
        assert!((sum as f64 - 2.0 * c.num_params() as f64).abs() / (sum as f64) < 0.01);
        assert!(plan.describe(&c, p, Some(141_000_000_000)).contains("yes"));
    }

    #[test]
    fn replicated_lm_head_holds_every_row() {
        let c = cfg("llama-70b");
        let p = MemoryParams {
            dtype_bytes: 2,
            batch_size: 1,
            max_seq_len: 1024,
        };
        let split = ParallelPlan::new(&c, 4, 1).unwrap();
        let repl = ParallelPlan::new(&c, 4, 1).unwrap().with_replicated_lm_head(&c);
        let r = &repl.ranks[3];
        assert_eq!((r.lm_head.clone(), r.lm_head_padded), (0..128256, 128256));
        assert_eq!(split.ranks[3].lm_head, 96192..128256);
        let extra = repl.memory(&c, 3, p).weights - split.memory(&c, 3, p).weights;
        assert_eq!(extra, (128256 - 32064) * 8192 * 2);
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_bytes("141GB").unwrap(), 141_000_000_000);
        assert_eq!(parse_bytes("80GiB").unwrap(), 80 << 30);
        assert_eq!(parse_bytes("1.5 kB").unwrap(), 1500);
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("12 parsecs").is_err());
    }
}
