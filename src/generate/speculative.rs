//! The acceptance rule of self-speculative decoding: a drafted token `x`, drawn from the draft's
//! distribution `q`, is checked against the verifier's distribution `p` at the same position
//! (both after the request's sampling transforms, [`Sampler::distribution`]).
//!
//! Sampling: `x` is kept with probability `min(1, p(x) / q(x))`; otherwise the position gets a
//! token drawn from the normalized positive part of `p - q`. Whatever `q` is, the token that comes
//! out is distributed as `p` (Leviathan et al. 2023, Chen et al. 2023), so speculation does not
//! change what a request samples from. Greedy decoding (`p` and `q` one-hot at their argmax) is the
//! special case "keep `x` when it is the verifier's argmax, else take the argmax", and draws no
//! random number.

use super::Sampler;

/// What verification made of one drafted token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The draft stands.
    Accept,
    /// The draft is rejected; this token takes its position and the round ends.
    Replace(u32),
}

fn probability(distribution: &[(u32, f64)], token: u32) -> f64 {
    distribution.iter().find(|&&(id, _)| id == token).map_or(0.0, |&(_, q)| q)
}

/// Checks draft `token` (drawn from `q`) against the verifier's `p`.
pub fn verify(sampler: &mut Sampler, p: &[(u32, f64)], q: &[(u32, f64)], token: u32) -> Verdict {
    if sampler.params().is_greedy() {
        let best = p.first().map_or(token, |&(id, _)| id);
        return if best == token { Verdict::Accept } else { Verdict::Replace(best) };
    }
    let (pt, qt) = (probability(p, token), probability(q, token));
    if qt > 0.0 && sampler.uniform() < (pt / qt).min(1.0) {
        return Verdict::Accept;
    }
    Verdict::Replace(sampler.draw(&residual(p, q)))
}

/// The normalized positive part of `p - q`, most likely first (`p` itself where `p <= q`
/// everywhere, which happens only when the two are equal up to rounding).
pub fn residual(p: &[(u32, f64)], q: &[(u32, f64)]) -> Vec<(u32, f64)> {
    let mut rest: Vec<(u32, f64)> =
        p.iter().map(|&(id, pv)| (id, pv - probability(q, id))).filter(|&(_, r)| r > 0.0).collect();
    let total: f64 = rest.iter().map(|&(_, r)| r).sum();
    if rest.is_empty() || total <= 0.0 {
        return p.to_vec();
    }
    rest.iter_mut().for_each(|(_, r)| *r /= total);
    rest.sort_by(|a, b| b.1.total_cmp(&a.1));
    rest
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::SamplingParams;

    fn sampling(seed: u64) -> Sampler {
        Sampler::new(SamplingParams { temperature: 1.0, ..Default::default() }, seed)
    }

    #[test]
    fn greedy_keeps_the_verifiers_argmax_and_draws_nothing() {
        let mut greedy = Sampler::new(SamplingParams::default(), 1);
        let p = [(3, 1.0)];
        assert_eq!(verify(&mut greedy, &p, &[(3, 1.0)], 3), Verdict::Accept);
        assert_eq!(verify(&mut greedy, &p, &[(5, 1.0)], 5), Verdict::Replace(3));
    }

    #[test]
    fn the_output_is_distributed_as_the_verifier_whatever_the_draft() {
        // p and q disagree strongly; the kept-or-replaced token must follow p.
        let p = vec![(0, 0.5), (1, 0.3), (2, 0.15), (3, 0.05)];
        let q = vec![(3, 0.55), (2, 0.25), (0, 0.15), (1, 0.05)];
        let mut draft = sampling(11);
        let mut verifier = sampling(12);
        let trials = 200_000;
        let mut counts = [0usize; 4];
        let mut accepted = 0;
        for _ in 0..trials {
            let x = draft.draw(&q);
            let token = match verify(&mut verifier, &p, &q, x) {
                Verdict::Accept => {
                    accepted += 1;
                    x
                }
                Verdict::Replace(y) => y,
            };
            counts[token as usize] += 1;
        }
        for (id, want) in [0.5, 0.3, 0.15, 0.05].into_iter().enumerate() {
            let got = counts[id] as f64 / trials as f64;
            // 5 standard errors of a binomial proportion.
            let bound = 5.0 * (want * (1.0 - want) / trials as f64).sqrt();
            assert!((got - want).abs() < bound, "token {id}: {got} against {want}");
        }
        // The acceptance rate is sum(min(p, q)) = 0.15 + 0.05 + 0.15 + 0.05 = 0.4.
        let rate = accepted as f64 / trials as f64;
        assert!((rate - 0.4).abs() < 0.01, "acceptance rate {rate}");
    }

    #[test]
    fn the_residual_is_the_positive_part_of_p_minus_q() {
        let r = residual(&[(0, 0.6), (1, 0.4)], &[(0, 0.2), (1, 0.8)]);
        assert_eq!(r, vec![(0, 1.0)]);
        let same = residual(&[(0, 0.6), (1, 0.4)], &[(1, 0.4), (0, 0.6)]);
        assert_eq!(same, vec![(0, 0.6), (1, 0.4)], "equal distributions: p itself");
    }
}
