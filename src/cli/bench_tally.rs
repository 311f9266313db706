//! One benchmark setting's totals over the runs it had, shared by the decoding benchmarks, and
//! the median the benchmarks report.

use huginn::engine::{Completion, DraftCounts, WaveCounts};
use huginn::train::eval::EvalResult;

/// The median of `values` (0 for none; the mean of the middle two for an even count).
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

#[derive(Default)]
pub struct Tally {
    pub correct: usize,
    pub problems: usize,
    pub tokens: usize,
    pub seconds: f64,
    /// Tokens after each output's first, and the seconds they took.
    pub decode_tokens: usize,
    pub decode_seconds: f64,
    pub drafts: DraftCounts,
    pub waves: WaveCounts,
    /// Core steps, counted per sequence (every draft, verification and window row).
    pub steps: usize,
}

impl Tally {
    /// An evaluation that took `seconds`.
    pub fn add(&mut self, r: &EvalResult, seconds: f64) {
        self.correct += r.correct;
        self.problems += r.problems;
        self.tokens += r.tokens();
        self.seconds += seconds;
        self.decode_tokens += r.tokens() - r.problems;
        self.decode_seconds += r.decode_seconds;
        self.drafts += r.drafts;
        self.waves += r.waves;
        self.steps += r.steps();
    }

    /// The outputs of one run (every choice), the run's seconds counted apart.
    pub fn add_outputs<'a>(&mut self, outputs: impl IntoIterator<Item = &'a Completion>) {
        for c in outputs {
            self.tokens += c.token_ids.len();
            self.drafts += c.drafts();
            self.waves += c.waves();
            self.steps += c.steps_per_token.iter().sum::<usize>();
        }
    }

    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.problems.max(1) as f64
    }

    pub fn tokens_per_second(&self) -> f64 {
        self.tokens as f64 / self.seconds.max(1e-9)
    }

    pub fn decode_tokens_per_second(&self) -> f64 {
        self.decode_tokens as f64 / self.decode_seconds.max(1e-9)
    }

    pub fn steps_per_token(&self) -> f64 {
        self.steps as f64 / self.tokens.max(1) as f64
    }

    /// Share of drafts kept, `-` without speculation.
    pub fn acceptance(&self) -> String {
        let DraftCounts { drafted, accepted } = self.drafts;
        if drafted == 0 { "-".into() } else { format!("{:.0}%", 100.0 * accepted as f64 / drafted as f64) }
    }
}
