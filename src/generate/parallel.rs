//! The parallel ("diffusion-forcing") sampler's parameters, their resolution from a request, and
//! its freeze rules (docs/DESIGN.md, "The parallel sampler"). The engine runs it
//! (`engine::wavefront`); this module decides, from numbers alone, how many window rows freeze.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::check::FieldError;

/// Relative latent change below which a window position counts as converged, unless the request
/// gives `exit_threshold`.
pub const DEFAULT_FREEZE_THRESHOLD: f64 = 0.03;

/// How tokens are produced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum SamplerKind {
    /// One token at a time, each iterated to its exit or cap.
    #[default]
    Sequential,
    /// A wavefront of positions iterated together, frozen as they converge.
    Parallel,
}

/// When window positions freeze.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum FreezeRule {
    /// Everything up to the last converged position (the authors' code).
    #[default]
    LatentDiff,
    /// The longest prefix of converged positions (the paper's text).
    LatentDiffStrict,
    /// The head, once it has iterated `num_steps` steps: one position per sampler step.
    Fixed,
}

macro_rules! named_values {
    ($t:ty, $field:literal, $what:literal, $($variant:path => $name:literal),+) => {
        impl $t {
            pub fn name(&self) -> &'static str {
                match self { $($variant => $name),+ }
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.name())
            }
        }
        impl FromStr for $t {
            type Err = FieldError;
            fn from_str(s: &str) -> Result<Self, FieldError> {
                match s {
                    $($name => Ok($variant),)+
                    _ => Err(FieldError::new($field, format!(
                        concat!("unknown ", $what, " `{}` (one of {})"), s, [$($name),+].join(", ")
                    ))),
                }
            }
        }
        impl TryFrom<String> for $t {
            type Error = FieldError;
            fn try_from(s: String) -> Result<Self, FieldError> {
                s.parse()
            }
        }
        impl From<$t> for String {
            fn from(value: $t) -> String {
                value.name().to_string()
            }
        }
    };
}

named_values!(SamplerKind, "sampler", "sampler", SamplerKind::Sequential => "sequential", SamplerKind::Parallel => "parallel");
named_values!(FreezeRule, "freeze", "freeze rule", FreezeRule::LatentDiff => "latent-diff",
    FreezeRule::LatentDiffStrict => "latent-diff-strict", FreezeRule::Fixed => "fixed");

/// The parallel sampler of one generation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ParallelSampling {
    /// Core steps per sampler step (r').
    pub inner_steps: usize,
    pub freeze: FreezeRule,
    /// Relative latent change below which a position converged (the latent-diff rules).
    pub threshold: f64,
    /// Most positions in flight.
    pub max_wavefront: usize,
    /// β: each sampler step mixes `β / (1 + steps so far)` of fresh noise into every state.
    pub state_noise: f64,
    /// η: a position's input embedding is `(1 - η)·new + η·previous` once it has one.
    pub embed_ema: f64,
}

/// One window row after a sampler step, as the freeze rules see it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowStatus {
    /// Core steps the position has had.
    pub steps: usize,
    /// Its relative latent change over the last sampler step; `None` for a position new to the window.
    pub change: Option<f64>,
}

/// Why a frozen position stopped iterating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrozenBy {
    /// Its own state converged.
    Converged,
    /// It reached `num_steps`.
    Cap,
    /// A later position converged (latent-diff) or the step budget ran out.
    Carried,
}

impl ParallelSampling {
    /// Rows of the window (head first) that freeze now: with `num_steps` as every position's cap
    /// and no convergence counted before `min_steps`. Steps never grow along the window, so the
    /// capped rows are a prefix.
    pub fn frozen_rows(&self, rows: &[RowStatus], num_steps: usize, min_steps: usize) -> usize {
        let capped = rows.iter().take_while(|r| r.steps >= num_steps).count();
        let converged = |r: &RowStatus| r.steps >= min_steps && r.change.is_some_and(|c| c < self.threshold);
        let by_rule = match self.freeze {
            FreezeRule::Fixed => 0,
            FreezeRule::LatentDiff => rows.iter().rposition(converged).map_or(0, |i| i + 1),
            FreezeRule::LatentDiffStrict => rows.iter().take_while(|r| converged(r)).count(),
        };
        capped.max(by_rule)
    }

    /// Why row `row` of a freeze of `rows` stopped.
    pub fn frozen_by(&self, row: &RowStatus, num_steps: usize, min_steps: usize) -> FrozenBy {
        if row.steps >= num_steps {
            FrozenBy::Cap
        } else if self.freeze != FreezeRule::Fixed
            && row.steps >= min_steps
            && row.change.is_some_and(|c| c < self.threshold)
        {
            FrozenBy::Converged
        } else {
            FrozenBy::Carried
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampling(freeze: FreezeRule) -> ParallelSampling {
        ParallelSampling { inner_steps: 4, freeze, threshold: 0.1, max_wavefront: 8, state_noise: 0.0, embed_ema: 0.1 }
    }

    fn rows(steps_and_changes: &[(usize, Option<f64>)]) -> Vec<RowStatus> {
        steps_and_changes.iter().map(|&(steps, change)| RowStatus { steps, change }).collect()
    }

    #[test]
    fn the_two_latent_rules_differ_on_a_gap() {
        // Rows 0 and 2 converged, row 1 not, row 3 is new.
        let window = rows(&[(12, Some(0.01)), (8, Some(0.5)), (4, Some(0.02)), (0, None)]);
        assert_eq!(sampling(FreezeRule::LatentDiff).frozen_rows(&window, 32, 0), 3, "up to the last converged");
        assert_eq!(sampling(FreezeRule::LatentDiffStrict).frozen_rows(&window, 32, 0), 1, "the converged prefix");
        assert_eq!(sampling(FreezeRule::Fixed).frozen_rows(&window, 32, 0), 0, "no row has num_steps yet");
        assert_eq!(sampling(FreezeRule::LatentDiff).frozen_rows(&window, 32, 5), 1, "min_steps holds row 2 back");
        let why = |i: usize| sampling(FreezeRule::LatentDiff).frozen_by(&window[i], 32, 0);
        assert_eq!((why(0), why(1), why(2)), (FrozenBy::Converged, FrozenBy::Carried, FrozenBy::Converged));
    }

    #[test]
    fn every_rule_freezes_the_positions_at_their_cap() {
        let window = rows(&[(8, Some(0.9)), (8, Some(0.9)), (4, Some(0.9)), (0, None)]);
        for freeze in [FreezeRule::LatentDiff, FreezeRule::LatentDiffStrict, FreezeRule::Fixed] {
            assert_eq!(sampling(freeze).frozen_rows(&window, 8, 0), 2, "{freeze}");
        }
        assert_eq!(sampling(FreezeRule::Fixed).frozen_by(&window[0], 8, 0), FrozenBy::Cap);
        assert_eq!(sampling(FreezeRule::Fixed).frozen_rows(&window[2..], 8, 0), 0);
    }

    #[test]
    fn names_parse_back() {
        for rule in [FreezeRule::LatentDiff, FreezeRule::LatentDiffStrict, FreezeRule::Fixed] {
            assert_eq!(rule.name().parse::<FreezeRule>().unwrap(), rule);
        }
        assert_eq!("parallel".parse::<SamplerKind>().unwrap(), SamplerKind::Parallel);
        let message = "diffusion".parse::<SamplerKind>().unwrap_err().to_string();
        assert!(message.contains("sequential, parallel"), "{message}");
    }
}
