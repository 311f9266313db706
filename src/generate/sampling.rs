//! Next-token selection: logit processors (bias, repetition / presence / frequency penalties),
//! then greedy or seeded sampling with temperature, top-k, top-p and min-p.

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use crate::model::exit::argmax;

/// Temperatures below this are greedy (argmax): dividing logits by a smaller one only sharpens a
/// distribution that is already one-hot to f64 precision, and a temperature near zero would
/// overflow the scaled logits (the floor vLLM uses too).
pub const GREEDY_TEMPERATURE: f32 = 1e-5;

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Below [`GREEDY_TEMPERATURE`] (0 included) means greedy (argmax).
    pub temperature: f32,
    /// 0 disables.
    pub top_k: usize,
    /// 1 disables.
    pub top_p: f32,
    /// 0 disables.
    pub min_p: f32,
    /// HF-style: positive logits of seen tokens are divided by it, negative ones multiplied. 1 disables.
    pub repetition_penalty: f32,
    /// OpenAI-style: subtracted once from the logit of every token already generated.
    pub presence_penalty: f32,
    /// OpenAI-style: subtracted per occurrence in the generated text.
    pub frequency_penalty: f32,
    /// Added to the logits of the given token ids.
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
        }
    }
}

impl SamplingParams {
    /// Greedy decoding: the argmax, no random number drawn.
    pub fn is_greedy(&self) -> bool {
        self.temperature < GREEDY_TEMPERATURE
    }
}

/// The sampler seed of a sequence whose state-initialisation seed is `seed`: the two RNG streams
/// stay independent, and `huginn generate` and the server derive them the same way.
pub fn sampler_seed(seed: u64) -> u64 {
    seed.wrapping_add(0x9E37_79B9_7F4A_7C15)
}

/// Picks tokens for one sequence; reproducible for a given seed.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Occurrences of each generated token (presence / frequency penalties).
    generated: HashMap<u32, usize>,
}

impl Sampler {
    pub fn new(params: SamplingParams, seed: u64) -> Self {
        Self { params, rng: StdRng::seed_from_u64(seed), generated: HashMap::new() }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Records a generated token for the presence and frequency penalties.
    pub fn record(&mut self, token: u32) {
        *self.generated.entry(token).or_insert(0) += 1;
    }

    /// Applies the logit processors in place; `context` holds prompt and generated ids.
    pub fn process(&self, logits: &mut [f32], context: &[u32]) {
        let p = &self.params;
        for &(id, bias) in &p.logit_bias {
            if let Some(l) = logits.get_mut(id as usize) {
                *l += bias;
            }
        }
        if p.repetition_penalty != 1.0 {
            let mut seen = context.to_vec();
            seen.sort_unstable();
            seen.dedup();
            for id in seen {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = if *l < 0.0 { *l * p.repetition_penalty } else { *l / p.repetition_penalty };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&id, &count) in &self.generated {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * count as f32;
                }
            }
        }
    }

    /// Takes back a [`Self::record`] (a drafted token that verification rejected).
    pub fn forget(&mut self, token: u32) {
        if let Some(count) = self.generated.get_mut(&token) {
            *count -= 1;
            if *count == 0 {
                self.generated.remove(&token);
            }
        }
    }

    /// Processes `logits` and picks the next token.
    pub fn sample(&mut self, logits: &mut [f32], context: &[u32]) -> u32 {
        if self.params.is_greedy() {
            // Greedy: the argmax, without building the one-token distribution.
            self.process(logits, context);
            return argmax(logits) as u32;
        }
        let distribution = self.distribution(logits, context);
        self.draw(&distribution)
    }

    /// The distribution [`Self::sample`] draws from: the logit processors, then temperature,
    /// top-k, top-p and min-p, as `(token, probability)` pairs, most likely first, summing to
    /// one. Greedy decoding is the argmax with probability one.
    pub fn distribution(&self, logits: &mut [f32], context: &[u32]) -> Vec<(u32, f64)> {
        self.process(logits, context);
        let p = &self.params;
        if p.is_greedy() {
            return vec![(argmax(logits) as u32, 1.0)];
        }
        // Scaled in f64 after subtracting the largest logit: every exponent is <= 0 and finite, so
        // no probability is NaN or infinite whatever the logits and temperature. A logit that is
        // not finite (never from the model) gets probability zero.
        let max = logits.iter().copied().filter(|l| l.is_finite()).fold(f32::NEG_INFINITY, f32::max);
        if !max.is_finite() {
            return vec![(argmax(logits) as u32, 1.0)];
        }
        let temperature = f64::from(p.temperature);
        let mut candidates: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| {
                let scaled =
                    if l.is_finite() { (f64::from(l) - f64::from(max)) / temperature } else { f64::NEG_INFINITY };
                (i as u32, scaled)
            })
            .collect();
        candidates.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        if p.top_k > 0 && p.top_k < candidates.len() {
            candidates.truncate(p.top_k);
        }
        // The first candidate's scaled logit is 0: the total is at least 1.
        let mut probs: Vec<f64> = candidates.iter().map(|&(_, l)| l.exp()).collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= total);
        if p.top_p < 1.0 {
            let mut cumulative = 0.0;
            let mut keep = probs.len();
            for (i, q) in probs.iter().enumerate() {
                cumulative += q;
                if cumulative >= p.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
        }
        if p.min_p > 0.0 {
            let floor = probs[0] * p.min_p as f64;
            let keep = probs.iter().take_while(|q| **q >= floor).count().max(1);
            probs.truncate(keep);
        }
        // Tokens of probability zero are never drawn; the most likely one always stays.
        let kept = probs.iter().rposition(|&q| q > 0.0).map_or(1, |last| last + 1);
        probs.truncate(kept);
        let total: f64 = probs.iter().sum();
        candidates.iter().zip(probs).map(|(&(id, _), q)| (id, q / total)).collect()
    }

    /// A draw from `distribution` (greedy: its first token, no random number drawn).
    pub fn draw(&mut self, distribution: &[(u32, f64)]) -> u32 {
        if self.params.is_greedy() {
            return distribution.first().map_or(0, |&(id, _)| id);
        }
        let mut draw = self.rng.random::<f64>();
        for &(id, q) in distribution {
            draw -= q;
            if draw <= 0.0 {
                return id;
            }
        }
        // Rounding left a sliver past the cumulative sum: the last token (of positive probability).
        distribution.last().map_or(0, |&(id, _)| id)
    }

    /// A uniform number in [0, 1) from the sampler's stream (the speculative acceptance test).
    pub fn uniform(&mut self) -> f64 {
        self.rng.random::<f64>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(params: SamplingParams) -> Sampler {
        Sampler::new(params, 7)
    }

    #[test]
    fn greedy_picks_argmax_and_bias_can_change_it() {
        let mut s = sampler(SamplingParams::default());
        assert_eq!(s.sample(&mut [0.1, 2.0, 1.0], &[]), 1);
        let mut s = sampler(SamplingParams { logit_bias: vec![(2, 5.0)], ..Default::default() });
        assert_eq!(s.sample(&mut [0.1, 2.0, 1.0], &[]), 2);
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative() {
        let s = sampler(SamplingParams { repetition_penalty: 2.0, ..Default::default() });
        let mut logits = [4.0, -1.0, 3.0];
        s.process(&mut logits, &[0, 1, 1]);
        assert_eq!(logits, [2.0, -2.0, 3.0]);
    }

    #[test]
    fn frequency_and_presence_penalties_count_generated_tokens() {
        let mut s = sampler(SamplingParams { presence_penalty: 0.5, frequency_penalty: 1.0, ..Default::default() });
        s.record(1);
        s.record(1);
        let mut logits = [0.0, 3.0];
        s.process(&mut logits, &[]);
        assert_eq!(logits, [0.0, 0.5]);
    }

    #[test]
    fn top_k_one_is_greedy_and_seed_reproduces() {
        let mut s = sampler(SamplingParams { temperature: 1.0, top_k: 1, ..Default::default() });
        for _ in 0..20 {
            assert_eq!(s.sample(&mut [0.0, 0.5, 0.2], &[]), 1);
        }
        let draw = |seed| {
            let mut s = Sampler::new(SamplingParams { temperature: 1.0, ..Default::default() }, seed);
            (0..32).map(|_| s.sample(&mut [0.0; 16], &[])).collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        assert_ne!(draw(3), draw(4));
    }

    #[test]
    fn top_p_and_min_p_cut_the_tail() {
        // probabilities ~ [0.64, 0.24, 0.09, 0.03]
        let logits = [3.0f32, 2.0, 1.0, 0.0];
        let mut s = sampler(SamplingParams { temperature: 1.0, top_p: 0.5, ..Default::default() });
        assert!((0..50).all(|_| s.sample(&mut logits.clone(), &[]) == 0));
        let mut s = sampler(SamplingParams { temperature: 1.0, min_p: 0.3, ..Default::default() });
        assert!((0..200).all(|_| s.sample(&mut logits.clone(), &[]) <= 1));
    }

    #[test]
    fn no_temperature_or_logits_give_a_nan_probability() {
        // 1e-40 is a subnormal f32: l / t overflowed to infinity and inf - inf was NaN.
        let logits = [2.5f32, -1.0, 2.4999, 0.0, -30.0];
        for temperature in [1e-40f32, 1e-38, 1e-37, 1e-6, 1e-5, 1e-3, 0.5, 1.0, 2.0] {
            for top_k in [0, 2] {
                for (top_p, min_p) in [(1.0, 0.0), (0.9, 0.0), (1.0, 0.5)] {
                    let params = SamplingParams { temperature, top_k, top_p, min_p, ..Default::default() };
                    let s = sampler(params);
                    let distribution = s.distribution(&mut logits.clone(), &[]);
                    let total: f64 = distribution.iter().map(|&(_, q)| q).sum();
                    assert!(
                        distribution.iter().all(|&(_, q)| q.is_finite() && q > 0.0),
                        "{temperature}: {distribution:?}"
                    );
                    assert!((total - 1.0).abs() < 1e-9, "{temperature}: sums to {total}");
                    assert_eq!(distribution[0].0, 0, "{temperature}: the most likely token first");
                }
            }
        }
        // Extreme logits at an ordinary temperature: the largest dominates, nothing is NaN.
        let extreme = [f32::MAX, -f32::MAX, 0.0, f32::MAX / 2.0, f32::NAN, f32::INFINITY];
        let s = sampler(SamplingParams { temperature: 1.0, ..Default::default() });
        let distribution = s.distribution(&mut extreme.clone(), &[]);
        assert_eq!(distribution, vec![(0, 1.0)], "only the largest finite logit has weight");
        let mut s = sampler(SamplingParams { temperature: 0.7, logit_bias: vec![(1, 100.0)], ..Default::default() });
        for _ in 0..20 {
            assert_eq!(s.sample(&mut [80.0, 0.0, -f32::MAX], &[]), 1, "a bias of 100 outweighs 80");
        }
    }

    #[test]
    fn a_temperature_below_the_floor_is_greedy_and_draws_nothing() {
        let logits = [0.1f32, 3.0, 2.9999, -5.0];
        for temperature in [1e-40f32, 1e-20, 9.9e-6] {
            let mut s = sampler(SamplingParams { temperature, ..Default::default() });
            assert!(s.params().is_greedy());
            assert_eq!(s.distribution(&mut logits.clone(), &[]), vec![(1, 1.0)]);
            assert!((0..10).all(|_| s.sample(&mut logits.clone(), &[]) == 1));
            let fresh = sampler(SamplingParams { temperature, ..Default::default() }).uniform();
            assert_eq!(s.uniform(), fresh, "greedy draws no random number");
        }
        let s = sampler(SamplingParams { temperature: GREEDY_TEMPERATURE, ..Default::default() });
        assert!(!s.params().is_greedy(), "the floor itself samples");
        let first = s.distribution(&mut logits.clone(), &[])[0];
        assert!(first.0 == 1 && first.1 > 0.999, "...from an all but one-hot distribution: {first:?}");
    }

    #[test]
    fn invalid_values_are_rejected() {
        assert!(SamplingParams { top_p: 0.0, ..Default::default() }.check().is_err());
        assert!(SamplingParams { temperature: -1.0, ..Default::default() }.check().is_err());
        assert!(SamplingParams { temperature: f32::NAN, ..Default::default() }.check().is_err());
        assert!(SamplingParams::default().check().is_ok());
    }
}
