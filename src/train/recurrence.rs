//! The number of recurrences of a training step: log-normal Poisson around a mean (the paper's
//! recipe): `tau ~ Normal(ln(mean) - sigma^2 / 2, sigma)`, `r = Poisson(e^tau) + 1`. Most steps use
//! a few recurrences, a heavy tail uses many, so the model learns to iterate towards a fixed point
//! and keeps improving (or holds) when run longer than the mean at inference.

use rand::{Rng, RngExt};

use crate::model::huginn::truncated_normal;

pub const SIGMA: f64 = 0.5;

/// One draw of the recurrence count, capped at `max`.
pub fn sample_recurrence(mean: f64, max: usize, rng: &mut impl Rng) -> usize {
    let tau = (mean.max(1.0)).ln() - SIGMA * SIGMA / 2.0 + SIGMA * truncated_normal(rng);
    (poisson(tau.exp(), rng) + 1).min(max.max(1))
}

/// Knuth's multiplication method (fine for the small rates used here).
fn poisson(lambda: f64, rng: &mut impl Rng) -> usize {
    let limit = (-lambda).exp();
    let mut product: f64 = rng.random::<f64>();
    let mut count = 0;
    while product > limit && count < 10_000 {
        product *= rng.random::<f64>();
        count += 1;
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn draws_centre_on_the_mean_with_a_tail_and_respect_the_cap() {
        let mut rng = StdRng::seed_from_u64(7);
        let draws: Vec<usize> = (0..20_000).map(|_| sample_recurrence(8.0, 64, &mut rng)).collect();
        let mean = draws.iter().sum::<usize>() as f64 / draws.len() as f64;
        // E[r] = E[Poisson(e^tau)] + 1 = mean + 1.
        assert!((mean - 9.0).abs() < 0.3, "mean {mean}");
        assert!(draws.iter().all(|&r| (1..=64).contains(&r)));
        assert!(draws.iter().any(|&r| r >= 20), "no tail");
        assert!(draws.iter().any(|&r| r <= 3), "no short draws");
        let capped = (0..1000).map(|_| sample_recurrence(8.0, 10, &mut rng)).max().unwrap();
        assert_eq!(capped, 10);
    }
}
