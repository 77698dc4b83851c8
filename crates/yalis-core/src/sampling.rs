//! Next-token sampling on the host: greedy, or temperature, top-k and top-p (nucleus) sampling
//! from one sequence's logits.

use std::cmp::Ordering;

use crate::error::{Error, Result};
use crate::rng::Rng;

#[derive(Clone, Copy, Debug)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// Keep the k most likely tokens; 0 = off.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches p; 1.0 = off.
    pub top_p: f32,
    pub seed: u64,
}

impl SamplingParams {
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }

    pub fn validate(&self) -> Result<()> {
        let t = self.temperature;
        if !(t.is_finite() && t >= 0.0) {
            return Err(Error::Invalid(format!(
                "--temperature must be finite and >= 0 (0 = greedy), got {t}"
            )));
        }
        let p = self.top_p;
        if !(p > 0.0 && p <= 1.0) {
            return Err(Error::Invalid(format!("--top-p must be in (0, 1] (1 = off), got {p}")));
        }
        // --top-k: any count is valid; 0 = off, and a k above the vocab keeps every token.
        Ok(())
    }
}

/// Samples one sequence. Each sequence owns one, with `stream` = its index, so its draws do not
/// depend on which other sequences share the batch.
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    /// (weight, token id): scaled logits, then unnormalised probabilities. Reused across steps.
    scratch: Vec<(f64, u32)>,
}

/// Higher weight first; ties to the lower id.
fn descending(a: &(f64, u32), b: &(f64, u32)) -> Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

/// Index of the largest logit; ties go to the lowest index, NaN is never chosen (0 if all are).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best: Option<(usize, f32)> = None;
    for (i, &x) in logits.iter().enumerate() {
        if !x.is_nan() && best.is_none_or(|(_, b)| x > b) {
            best = Some((i, x));
        }
    }
    best.map_or(0, |(i, _)| i as u32)
}

impl Sampler {
    pub fn new(params: SamplingParams, stream: u64) -> Self {
        Self::with_rng(params, Rng::new(params.seed, stream))
    }

    /// A sampler drawing from `rng` (one draw per non-greedy sample).
    pub fn with_rng(params: SamplingParams, rng: Rng) -> Self {
        Sampler {
            params,
            rng,
            scratch: Vec::new(),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// One token id from `logits` ([vocab] f32). O(V) without top-p, O(V log V) with it.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let SamplingParams {
            temperature,
            top_k,
            top_p,
            ..
        } = self.params;
        if temperature == 0.0 {
            return argmax(logits);
        }
        let inv_t = 1.0 / temperature as f64;
        let s = &mut self.scratch;
        s.clear();
        s.extend(
            (0u32..)
                .zip(logits)
                .filter(|(_, x)| !x.is_nan())
                .map(|(i, &x)| (x as f64 * inv_t, i)),
        );
        if top_k > 0 && top_k < s.len() {
            s.select_nth_unstable_by(top_k - 1, descending);
            s.truncate(top_k);
        }
        let sorted = top_p < 1.0;
        if sorted {
            s.sort_unstable_by(descending);
        }
        let max = s.iter().map(|w| w.0).fold(f64::NEG_INFINITY, f64::max);
        if !max.is_finite() {
            // Empty, all -inf, or a +inf logit: nothing to weigh.
            return argmax(logits);
        }
        let mut total = 0.0;
        for w in s.iter_mut() {
            w.0 = (w.0 - max).exp();
            total += w.0;
        }
        if sorted {
            let target = top_p as f64 * total;
            let mut cum = 0.0;
            let keep = s
                .iter()
                .position(|w| {
                    cum += w.0;
                    cum >= target
                })
                .map_or(s.len(), |i| i + 1);
            s.truncate(keep);
            total = cum;
        }
        // Invert the CDF in token-id order, whatever order the filters left: the draw then
        // depends only on the kept set and its weights, as in the GPU sampler.
        if sorted || top_k > 0 {
            s.sort_unstable_by_key(|w| w.1);
        }
        let u = self.rng.next_f32() as f64 * total;
        let mut cum = 0.0;
        for &(w, id) in s.iter() {
            cum += w;
            if u < cum {
                return id;
            }
        }
        s.last().map_or(0, |w| w.1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            seed,
        }
    }

    fn random_logits(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = Rng::new(seed, 99);
        (0..n).map(|_| rng.next_f32() * 8.0 - 4.0).collect()
    }

    fn softmax(logits: &[f32], t: f32) -> Vec<f64> {
        let e: Vec<f64> = logits.iter().map(|&x| (x as f64 / t as f64).exp()).collect();
        let sum: f64 = e.iter().sum();
        e.iter().map(|x| x / sum).collect()
    }

    fn frequencies(p: SamplingParams, logits: &[f32], n: usize) -> Vec<f64> {
        let mut sampler = Sampler::new(p, 0);
        let mut counts = vec![0usize; logits.len()];
        for _ in 0..n {
            counts[sampler.sample(logits) as usize] += 1;
        }
        counts.iter().map(|&c| c as f64 / n as f64).collect()
    }

    #[test]
    fn validate_names_the_flag() {
        assert!(SamplingParams::greedy().validate().is_ok());
        assert!(params(0.7, 50, 0.9, 1).validate().is_ok());
        for (p, flag) in [
            (params(-1.0, 0, 1.0, 0), "--temperature"),
            (params(f32::NAN, 0, 1.0, 0), "--temperature"),
            (params(f32::INFINITY, 0, 1.0, 0), "--temperature"),
            (params(1.0, 0, 0.0, 0), "--top-p"),
            (params(1.0, 0, 1.5, 0), "--top-p"),
            (params(1.0, 0, f32::NAN, 0), "--top-p"),
        ] {
            let msg = p.validate().unwrap_err().to_string();
            assert!(msg.contains(flag), "{msg}");
        }
    }

    #[test]
    fn greedy_is_argmax_lowest_tie_never_nan() {
        let mut s = Sampler::new(SamplingParams::greedy(), 0);
        assert_eq!(s.sample(&[0.1, 3.0, -2.0, 3.0]), 1);
        assert_eq!(s.sample(&[f32::NAN, -1.0, f32::NAN, -0.5]), 3);
        assert_eq!(s.sample(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), 0);
        assert_eq!(s.sample(&[f32::NAN, f32::NAN]), 0);
    }

    #[test]
    fn nan_never_sampled() {
        let logits = [f32::NAN, 0.0, f32::NAN, 0.0];
        let f = frequencies(params(1.0, 0, 1.0, 3), &logits, 2000);
        assert_eq!(f[0] + f[2], 0.0);
    }

    #[test]
    fn seeds_and_streams() {
        let logits = random_logits(1000, 1);
        let p = params(1.0, 0, 1.0, 42);
        let draw = |stream| {
            let mut s = Sampler::new(p, stream);
            (0..32).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(0), draw(0));
        assert_ne!(draw(0), draw(1));
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut s = Sampler::new(params(1.5, 1, 1.0, 7), 0);
        for seed in 0..20 {
            let logits = random_logits(500, seed);
            assert_eq!(s.sample(&logits), argmax(&logits));
        }
    }

    #[test]
    fn top_k_three_keeps_the_three_largest() {
        let logits = random_logits(200, 5);
        let mut order: Vec<u32> = (0..200).collect();
        order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
        let top3 = &order[..3];
        let mut s = Sampler::new(params(5.0, 3, 1.0, 11), 0);
        let mut seen = [false; 3];
        for _ in 0..2000 {
            let id = s.sample(&logits);
            let pos = top3.iter().position(|&t| t == id).expect("outside top 3");
            seen[pos] = true;
        }
        assert_eq!(seen, [true; 3]);
    }

    #[test]
    fn small_top_p_is_argmax() {
        // Of 1000 tokens the most likely has probability >= 1/1000, so it alone is the nucleus.
        let mut s = Sampler::new(params(1.0, 0, 1e-3, 3), 0);
        for seed in 0..20 {
            let logits = random_logits(1000, seed);
            assert_eq!(s.sample(&logits), argmax(&logits));
        }
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // probabilities ~ [0.5, 0.3, 0.15, 0.05]: p = 0.7 keeps tokens 0 and 1 only.
        let logits = [0.5f32, 0.3, 0.15, 0.05].map(f32::ln);
        let f = frequencies(params(1.0, 0, 0.7, 9), &logits, 20_000);
        assert_eq!(f[2] + f[3], 0.0);
        assert!((f[0] - 0.625).abs() < 0.02, "{f:?}");
    }

    #[test]
    fn frequencies_match_softmax() {
        let logits = [1.0f32, 2.0, 0.5, -1.0];
        let f = frequencies(params(1.0, 0, 1.0, 123), &logits, 20_000);
        for (got, want) in f.iter().zip(softmax(&logits, 1.0)) {
            assert!((got - want).abs() < 0.02, "{f:?}");
        }
    }

    #[test]
    fn temperature_sharpens() {
        let logits = [1.0f32, 2.0, 0.5, -1.0];
        let cold = frequencies(params(0.5, 0, 1.0, 5), &logits, 20_000);
        let hot = frequencies(params(2.0, 0, 1.0, 5), &logits, 20_000);
        assert!(cold[1] > 0.8 && hot[1] < 0.46, "{cold:?} {hot:?}");
        for (got, want) in cold.iter().zip(softmax(&logits, 0.5)) {
            assert!((got - want).abs() < 0.02, "{cold:?}");
        }
    }
}
