//! Key choosers: uniform, and YCSB's scrambled zipfian (Gray et al., "Quickly generating
//! billion-record synthetic databases", as in YCSB's `ZipfianGenerator`).
//!
//! A zipfian with exponent `theta` in (0, 1) makes rank `i` (0-based) about `1 / (i+1)^theta`
//! times as likely as rank 0. Scrambling hashes the rank to a key (FNV-1a, modulo the key count),
//! so the hot keys are spread over the keyspace, and so over the partitions, rather than being
//! neighbours.

use rand::Rng;

/// The most keys a generator accepts (the zeta constant is a sum over every key).
pub const MAX_KEYS: u64 = 100_000_000;

/// Draws key indexes in `0..n`.
#[derive(Debug, Clone)]
pub enum KeyChooser {
    Uniform { n: u64 },
    Zipf(Zipf),
}

impl KeyChooser {
    /// `theta == 0` is uniform; otherwise a scrambled zipfian. `theta` must be in [0, 1).
    pub fn new(n: u64, theta: f64) -> Result<KeyChooser, String> {
        if n == 0 || n > MAX_KEYS {
            return Err(format!("the key count must be in 1..={MAX_KEYS}"));
        }
        if theta == 0.0 {
            return Ok(KeyChooser::Uniform { n });
        }
        Zipf::new(n, theta).map(KeyChooser::Zipf)
    }

    /// The number of keys drawn from.
    pub fn key_count(&self) -> u64 {
        match self {
            KeyChooser::Uniform { n } => *n,
            KeyChooser::Zipf(z) => z.n,
        }
    }

    pub fn next(&self, rng: &mut impl Rng) -> u64 {
        match self {
            KeyChooser::Uniform { n } => rng.random_range(0..*n),
            KeyChooser::Zipf(z) => scramble(z.next_rank(rng), z.n),
        }
    }
}

/// FNV-1a of the rank's bytes, modulo `n`.
pub fn scramble(rank: u64, n: u64) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in rank.to_le_bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash % n
}

/// The zipfian distribution over ranks `0..n`.
#[derive(Debug, Clone)]
pub struct Zipf {
    n: u64,
    theta: f64,
    zeta_n: f64,
    alpha: f64,
    eta: f64,
}

fn zeta(n: u64, theta: f64) -> f64 {
    (1..=n).map(|i| 1.0 / (i as f64).powf(theta)).sum()
}

impl Zipf {
    pub fn new(n: u64, theta: f64) -> Result<Zipf, String> {
        if !(0.0..1.0).contains(&theta) || theta == 0.0 {
            return Err(format!("--zipf must be in [0, 1), not {theta}"));
        }
        if n == 0 || n > MAX_KEYS {
            return Err(format!("the key count must be in 1..={MAX_KEYS}"));
        }
        let zeta_n = zeta(n, theta);
        let zeta_2 = zeta(2.min(n), theta);
        let eta = if n >= 2 {
            (1.0 - (2.0 / n as f64).powf(1.0 - theta)) / (1.0 - zeta_2 / zeta_n)
        } else {
            1.0
        };
        Ok(Zipf {
            n,
            theta,
            zeta_n,
            alpha: 1.0 / (1.0 - theta),
            eta,
        })
    }

    /// A rank in `0..n`; rank 0 is the most frequent.
    pub fn next_rank(&self, rng: &mut impl Rng) -> u64 {
        if self.n == 1 {
            return 0;
        }
        let u: f64 = rng.random();
        let uz = u * self.zeta_n;
        if uz < 1.0 {
            return 0;
        }
        if uz < 1.0 + 0.5f64.powf(self.theta) {
            return 1;
        }
        let rank = (self.n as f64 * (self.eta * u - self.eta + 1.0).powf(self.alpha)) as u64;
        rank.min(self.n - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    const DRAWS: usize = 200_000;

    impl Zipf {
        /// The probability of rank 0.
        fn p_first(&self) -> f64 {
            1.0 / self.zeta_n
        }
    }

    fn counts(chooser: impl Fn(&mut StdRng) -> u64, n: u64, seed: u64) -> Vec<u64> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut counts = vec![0u64; n as usize];
        for _ in 0..DRAWS {
            let k = chooser(&mut rng);
            assert!(k < n, "{k} out of 0..{n}");
            counts[k as usize] += 1;
        }
        counts
    }

    #[test]
    fn zipf_ranks_follow_the_power_law() {
        let n = 1000;
        let z = Zipf::new(n, 0.99).unwrap();
        let c = counts(|r| z.next_rank(r), n, 7);
        // Rank 0 has probability 1/zeta(n): within 5% of it.
        let p0 = c[0] as f64 / DRAWS as f64;
        assert!(
            (p0 - z.p_first()).abs() < 0.05 * z.p_first(),
            "{p0} vs {}",
            z.p_first()
        );
        // Rank 1 is drawn about 2^-theta as often as rank 0.
        let ratio = c[1] as f64 / c[0] as f64;
        assert!((ratio - 0.5f64.powf(0.99)).abs() < 0.05, "{ratio}");
        // The head is hot and the tail is cold, but the tail is drawn.
        let head: u64 = c[..10].iter().sum();
        let tail: u64 = c[500..].iter().sum();
        assert!(head > 3 * tail, "head {head} tail {tail}");
        assert!(tail > 0);
    }

    #[test]
    fn theta_zero_is_uniform_and_bad_parameters_are_refused() {
        let n = 100;
        let chooser = KeyChooser::new(n, 0.0).unwrap();
        let c = counts(|r| chooser.next(r), n, 1);
        let expected = DRAWS as f64 / n as f64;
        for (k, &count) in c.iter().enumerate() {
            assert!(
                (count as f64 - expected).abs() < 0.2 * expected,
                "key {k}: {count}"
            );
        }
        assert!(KeyChooser::new(n, 1.0).is_err());
        assert!(KeyChooser::new(n, -0.5).is_err());
        assert!(KeyChooser::new(0, 0.5).is_err());
        assert!(KeyChooser::new(MAX_KEYS + 1, 0.0).is_err());
    }

    #[test]
    fn scrambling_spreads_the_hot_keys_and_is_deterministic() {
        let n = 10_000;
        let chooser = KeyChooser::new(n, 0.99).unwrap();
        let a = counts(|r| chooser.next(r), n, 3);
        let b = counts(|r| chooser.next(r), n, 3);
        assert_eq!(a, b, "the same seed draws the same keys");
        // The ten hottest keys are not neighbours of each other.
        let mut hottest: Vec<usize> = (0..n as usize).collect();
        hottest.sort_by_key(|&k| std::cmp::Reverse(a[k]));
        let mut top: Vec<usize> = hottest[..10].to_vec();
        top.sort_unstable();
        assert!(top.windows(2).all(|w| w[1] - w[0] > 1), "{top:?}");
        let one = KeyChooser::new(1, 0.99).unwrap();
        assert_eq!(counts(|r| one.next(r), 1, 9)[0], DRAWS as u64);
    }
}
