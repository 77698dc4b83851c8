//! A small counter-based generator: the same (seed, stream, index) always gives the same value,
//! on any rank and in any order, so a rank can draw its slice of a tensor without drawing the
//! rest, and sampling is reproducible per sequence.

/// SplitMix64's finaliser: a bijective mix of 64 bits.
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a of a string, to turn a tensor name into a stream id.
pub fn hash_str(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Uniform in [0, 1) from the counter `(key, index)`.
pub fn uniform(key: u64, index: u64) -> f32 {
    let bits = mix64(key ^ mix64(index));
    (bits >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
}

/// A sequential generator over the same mix, for sampling.
#[derive(Clone, Debug)]
pub struct Rng {
    key: u64,
    counter: u64,
}

/// The key of stream `stream` under `seed`: draw `i` of that stream is `uniform(key, i)`.
pub fn stream_key(seed: u64, stream: u64) -> u64 {
    mix64(seed ^ mix64(stream.wrapping_add(0x5851_F42D_4C95_7F2D)))
}

impl Rng {
    pub fn new(seed: u64, stream: u64) -> Self {
        Rng {
            key: stream_key(seed, stream),
            counter: 0,
        }
    }

    /// The generator of stream `key` positioned at draw `counter`.
    pub fn at(key: u64, counter: u64) -> Self {
        Rng { key, counter }
    }

    /// Uniform in [0, 1).
    pub fn next_f32(&mut self) -> f32 {
        let u = uniform(self.key, self.counter);
        self.counter += 1;
        u
    }

    pub fn next_u64(&mut self) -> u64 {
        let v = mix64(self.key ^ mix64(self.counter));
        self.counter += 1;
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_is_in_range_and_spread() {
        let n = 100_000;
        let mut sum = 0.0f64;
        for i in 0..n {
            let u = uniform(7, i);
            assert!((0.0..1.0).contains(&u));
            sum += u as f64;
        }
        let mean = sum / n as f64;
        assert!((mean - 0.5).abs() < 0.01, "mean {mean}");
    }

    #[test]
    fn streams_differ_and_repeat() {
        let a: Vec<u64> = (0..4)
            .map(|_| 0)
            .scan(Rng::new(1, 0), |r, _| Some(r.next_u64()))
            .collect();
        let b: Vec<u64> = (0..4)
            .map(|_| 0)
            .scan(Rng::new(1, 0), |r, _| Some(r.next_u64()))
            .collect();
        let c: Vec<u64> = (0..4)
            .map(|_| 0)
            .scan(Rng::new(1, 1), |r, _| Some(r.next_u64()))
            .collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }
}
