//! Per-token adaptive exit: stop iterating the core block once a criterion says the latent state
//! (or the distribution it decodes to) has converged. Thresholds and first-step conventions follow
//! the reference implementation; `num_steps` stays the cap.

use std::fmt;
use std::str::FromStr;

use super::error::{ModelError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum ExitCriterion {
    /// Always run `num_steps`.
    None,
    /// `‖s_t − s_{t−1}‖ / ‖s_t‖ < τ`. No coda needed.
    LatentDiff,
    /// `1 − cos(s_t, s_{t−1}) < τ`. No coda needed.
    Cosine,
    /// `KL(p_{t−1} ‖ p_t) < τ`, `p_{−1}` uniform. Needs logits every step.
    Kl,
    /// KL on min-p(0.1)-filtered distributions.
    MinpKl,
    /// `|H_t − H_{t−1}| < τ`, `H_{−1} = 100`.
    EntropyDiff,
    /// The argmax unchanged for τ consecutive steps.
    ArgmaxStability,
    /// Ouro's learned exit gate (Q-exit): the first loop whose cumulative exit probability
    /// reaches τ. Only on a model with a gate.
    Gate,
}

impl ExitCriterion {
    pub const ALL: [ExitCriterion; 8] = [
        ExitCriterion::None,
        ExitCriterion::LatentDiff,
        ExitCriterion::Cosine,
        ExitCriterion::Kl,
        ExitCriterion::MinpKl,
        ExitCriterion::EntropyDiff,
        ExitCriterion::ArgmaxStability,
        ExitCriterion::Gate,
    ];

    pub fn name(&self) -> &'static str {
        match self {
            ExitCriterion::None => "none",
            ExitCriterion::LatentDiff => "latent-diff",
            ExitCriterion::Cosine => "cosine",
            ExitCriterion::Kl => "kl",
            ExitCriterion::MinpKl => "minp-kl",
            ExitCriterion::EntropyDiff => "entropy-diff",
            ExitCriterion::ArgmaxStability => "argmax-stability",
            ExitCriterion::Gate => "gate",
        }
    }

    /// The reference implementation's default threshold.
    pub fn default_threshold(&self) -> f64 {
        match self {
            ExitCriterion::None => 0.0,
            ExitCriterion::LatentDiff => 0.03,
            ExitCriterion::Cosine => 1e-3,
            ExitCriterion::Kl => 1e-3,
            ExitCriterion::MinpKl => 1e-5,
            ExitCriterion::EntropyDiff => 1e-3,
            ExitCriterion::ArgmaxStability => 5.0,
            ExitCriterion::Gate => 0.5,
        }
    }

    /// Whether the criterion needs the coda's logits at every checked step.
    pub fn needs_logits(&self) -> bool {
        matches!(
            self,
            ExitCriterion::Kl | ExitCriterion::MinpKl | ExitCriterion::EntropyDiff | ExitCriterion::ArgmaxStability
        )
    }

    /// Whether the criterion reads the model's exit gate (tracked on every step, prompts too).
    pub fn needs_gate(&self) -> bool {
        *self == ExitCriterion::Gate
    }

    /// Whether the criterion compares latent states.
    pub fn needs_latent(&self) -> bool {
        matches!(self, ExitCriterion::LatentDiff | ExitCriterion::Cosine)
    }
}

string_setting!(ExitCriterion);

impl fmt::Display for ExitCriterion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ExitCriterion {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self> {
        ExitCriterion::ALL.into_iter().find(|c| c.name() == s).ok_or_else(|| {
            let names: Vec<_> = ExitCriterion::ALL.iter().map(|c| c.name()).collect();
            ModelError::InvalidArgument(format!("unknown exit criterion `{s}` (one of {})", names.join(", ")))
        })
    }
}

/// When a token may stop iterating.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExitRule {
    pub criterion: ExitCriterion,
    pub threshold: f64,
    /// Steps before the criterion is first checked (checks start at 0-based step `min_steps`).
    pub min_steps: usize,
}

impl Default for ExitRule {
    fn default() -> Self {
        Self { criterion: ExitCriterion::None, threshold: 0.0, min_steps: 0 }
    }
}

impl ExitRule {
    pub fn new(criterion: ExitCriterion, threshold: Option<f64>, min_steps: usize) -> Result<Self> {
        let threshold = threshold.unwrap_or_else(|| criterion.default_threshold());
        if !threshold.is_finite() || threshold < 0.0 {
            return Err(ModelError::InvalidArgument(format!(
                "exit threshold must be a finite number >= 0, got {threshold}"
            )));
        }
        if criterion == ExitCriterion::Gate && threshold > 1.0 {
            return Err(ModelError::InvalidArgument(format!(
                "the gate's threshold is a cumulative probability, at most 1, got {threshold}"
            )));
        }
        Ok(Self { criterion, threshold, min_steps })
    }
}

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExitCheck {
    pub exit: bool,
    /// The criterion's value at this step (NaN where undefined, e.g. a zero previous state).
    pub value: f64,
}

/// Convergence tracking for one token's iteration.
pub struct ExitTracker {
    rule: ExitRule,
    prev_latent: Vec<f32>,
    prev_log_probs: Option<Vec<f64>>,
    prev_entropy: f64,
    prev_argmax: Option<usize>,
    stable_steps: usize,
}

impl ExitTracker {
    /// Starts tracking from the token's initial latent state (the comparison point of the first check).
    pub fn new(rule: ExitRule, initial_latent: Vec<f32>) -> Self {
        Self {
            rule,
            prev_latent: initial_latent,
            prev_log_probs: None,
            prev_entropy: 100.0,
            prev_argmax: None,
            stable_steps: 0,
        }
    }

    pub fn rule(&self) -> &ExitRule {
        &self.rule
    }

    /// Whether step `step` (0-based) is checked at all; skipped steps leave the tracker unchanged.
    pub fn checks_at(&self, step: usize) -> bool {
        self.rule.criterion != ExitCriterion::None && step >= self.rule.min_steps
    }

    /// Checks the state after step `step`. `latent` is the token's state; `logits` the coda's output
    /// for it, required when [`ExitCriterion::needs_logits`].
    pub fn check(&mut self, latent: &[f32], logits: Option<&[f32]>) -> Result<ExitCheck> {
        let tau = self.rule.threshold;
        let need_logits = || ModelError::InvalidArgument(format!("criterion {} needs logits", self.rule.criterion));
        let (value, exit) = match self.rule.criterion {
            ExitCriterion::None => (0.0, false),
            ExitCriterion::Gate => {
                return Err(ModelError::InvalidArgument("the gate criterion is tracked by `GateExit`".into()));
            }
            ExitCriterion::LatentDiff => {
                let (mut diff, mut norm) = (0.0f64, 0.0f64);
                for (a, b) in latent.iter().zip(&self.prev_latent) {
                    diff += (*a as f64 - *b as f64).powi(2);
                    norm += (*a as f64).powi(2);
                }
                let value = diff.sqrt() / norm.sqrt();
                self.prev_latent.copy_from_slice(latent);
                (value, value < tau)
            }
            ExitCriterion::Cosine => {
                let (mut dot, mut na, mut nb) = (0.0f64, 0.0f64, 0.0f64);
                for (a, b) in latent.iter().zip(&self.prev_latent) {
                    dot += *a as f64 * *b as f64;
                    na += (*a as f64).powi(2);
                    nb += (*b as f64).powi(2);
                }
                let value = 1.0 - dot / na.sqrt() / nb.sqrt();
                self.prev_latent.copy_from_slice(latent);
                (value, value < tau)
            }
            ExitCriterion::Kl | ExitCriterion::MinpKl => {
                let logits = logits.ok_or_else(need_logits)?;
                let log_probs = if self.rule.criterion == ExitCriterion::Kl {
                    log_softmax(logits)
                } else {
                    minp_log_probs(logits, 0.1)
                };
                let uniform = -(logits.len() as f64).ln();
                let value: f64 = match &self.prev_log_probs {
                    Some(prev) => prev.iter().zip(&log_probs).map(|(p, q)| p.exp() * (p - q)).sum(),
                    None => log_probs.iter().map(|q| uniform.exp() * (uniform - q)).sum(),
                };
                self.prev_log_probs = Some(log_probs);
                (value, value < tau)
            }
            ExitCriterion::EntropyDiff => {
                let log_probs = log_softmax(logits.ok_or_else(need_logits)?);
                let entropy: f64 = -log_probs.iter().map(|lp| lp.exp() * (lp.exp() + 1e-10).ln()).sum::<f64>();
                let value = (entropy - self.prev_entropy).abs();
                self.prev_entropy = entropy;
                (value, value < tau)
            }
            ExitCriterion::ArgmaxStability => {
                let top = argmax(logits.ok_or_else(need_logits)?);
                self.stable_steps = if Some(top) == self.prev_argmax { self.stable_steps + 1 } else { 0 };
                self.prev_argmax = Some(top);
                let value = self.stable_steps as f64;
                (value, value >= tau)
            }
        };
        Ok(ExitCheck { exit, value })
    }
}

/// What happens to the loops a token skips by exiting early (`exit_kv`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum ExitKv {
    /// The token stops computing; later tokens read its deepest K/V entry.
    #[default]
    Skip,
    /// The token's remaining loops still run, for their K/V only; its output is the exit loop's
    /// (what the Ouro reference computes). Spends every step.
    Fill,
}

impl ExitKv {
    pub fn name(&self) -> &'static str {
        match self {
            ExitKv::Skip => "skip",
            ExitKv::Fill => "fill",
        }
    }
}

string_setting!(ExitKv);

impl fmt::Display for ExitKv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ExitKv {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "skip" => Ok(ExitKv::Skip),
            "fill" => Ok(ExitKv::Fill),
            other => Err(ModelError::InvalidArgument(format!("unknown exit_kv `{other}` (one of skip, fill)"))),
        }
    }
}

/// Ouro's Q-exit over the rows of a chunk: each row's cumulative exit probability over its loops,
/// computed as the reference does (float32 products; the cumulative sum accumulated in float64
/// and each partial sum rounded to float32, as torch's CPU `cumsum`), and which rows exited.
#[derive(Debug, Clone, Default)]
pub struct GateExit {
    /// Per row: probability mass not yet spent, cumulative probability so far, exited.
    rows: Vec<(f32, f64, bool)>,
}

impl GateExit {
    pub fn new(rows: usize) -> Self {
        Self { rows: vec![(1.0, 0.0, false); rows] }
    }

    /// Each row's `λ` after a loop. With `decide`, rows whose cumulative probability reaches `q`
    /// exit at this loop (false at the last loop, which every remaining row takes anyway, and
    /// before `min_steps`); returns the rows that exited now.
    pub fn push(&mut self, lambdas: &[f32], q: f64, decide: bool) -> Vec<bool> {
        self.rows
            .iter_mut()
            .zip(lambdas)
            .map(|((remaining, cdf, exited), &lambda)| {
                let p = lambda * *remaining;
                *remaining *= 1.0 - lambda;
                *cdf += p as f64;
                // Compared as float32 values, as the reference compares its float32 cdf.
                let now = decide && !*exited && *cdf as f32 >= q as f32;
                *exited |= now;
                now
            })
            .collect()
    }

    /// Each row's cumulative exit probability so far.
    pub fn cdf(&self) -> Vec<f32> {
        self.rows.iter().map(|r| r.1 as f32).collect()
    }
}

pub fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    let log_z = max + sum.ln();
    logits.iter().map(|&l| l as f64 - log_z).collect()
}

/// Probabilities below `ratio · max` are replaced by `1/V`, then renormalised (reference min-p KL).
fn minp_log_probs(logits: &[f32], ratio: f64) -> Vec<f64> {
    let vocab = logits.len() as f64;
    let mut probs: Vec<f64> = log_softmax(logits).into_iter().map(f64::exp).collect();
    let max = probs.iter().copied().fold(0.0, f64::max);
    for p in probs.iter_mut() {
        if *p < ratio * max {
            *p = 1.0 / vocab;
        }
    }
    let total: f64 = probs.iter().sum();
    probs.into_iter().map(|p| (p / total).ln()).collect()
}

/// Index of the first maximum.
pub fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_criterion_and_rejects_unknown() {
        for c in ExitCriterion::ALL {
            assert_eq!(c.name().parse::<ExitCriterion>().unwrap(), c);
        }
        let err = "fast".parse::<ExitCriterion>().unwrap_err().to_string();
        assert!(err.contains("fast") && err.contains("latent-diff"), "{err}");
    }

    #[test]
    fn latent_diff_fires_only_below_threshold() {
        let rule = ExitRule::new(ExitCriterion::LatentDiff, None, 0).unwrap();
        let mut t = ExitTracker::new(rule, vec![0.0, 0.0]);
        let first = t.check(&[1.0, 0.0], None).unwrap();
        assert_eq!(first.value, 1.0);
        assert!(!first.exit);
        let second = t.check(&[1.0, 0.01], None).unwrap();
        assert!(second.exit && second.value < 0.03);
    }

    #[test]
    fn argmax_stability_counts_consecutive_repeats() {
        let rule = ExitRule::new(ExitCriterion::ArgmaxStability, Some(2.0), 0).unwrap();
        let mut t = ExitTracker::new(rule, vec![]);
        let same = [0.0f32, 1.0, 0.5];
        assert!(!t.check(&[], Some(&same)).unwrap().exit);
        assert!(!t.check(&[], Some(&same)).unwrap().exit);
        assert!(t.check(&[], Some(&same)).unwrap().exit);
    }

    #[test]
    fn kl_from_uniform_then_zero_for_identical_logits() {
        let rule = ExitRule::new(ExitCriterion::Kl, None, 0).unwrap();
        let mut t = ExitTracker::new(rule, vec![]);
        let logits = [2.0f32, 0.0, -1.0];
        assert!(t.check(&[], Some(&logits)).unwrap().value > 0.1);
        let again = t.check(&[], Some(&logits)).unwrap();
        assert!(again.value.abs() < 1e-12 && again.exit);
    }

    #[test]
    fn negative_or_nan_threshold_is_rejected() {
        assert!(ExitRule::new(ExitCriterion::Kl, Some(-1.0), 0).is_err());
        assert!(ExitRule::new(ExitCriterion::Kl, Some(f64::NAN), 0).is_err());
    }
}
