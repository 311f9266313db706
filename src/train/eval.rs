//! Exact-match accuracy on fresh, held-out addition problems, at a given compute budget.

use std::sync::Arc;

use rand::SeedableRng;
use rand::rngs::StdRng;

use super::addition::{Formatter, Problem, Split};
use crate::engine::{DraftCounts, Driver, JobSpec, RunError, WaveCounts};
use crate::generate::{Decoding, FinishReason, GenerationParams};
use crate::model::{ExitRule, HuginnModel};
use crate::text::TextTokenizer;

/// `count` problems with operands below `10^digits` from the held-out split (never trained on).
pub fn held_out_problems(count: usize, digits: u32, seed: u64) -> Vec<Problem> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..count).map(|_| Problem::sample(digits, Split::Held, &mut rng)).collect()
}

/// One evaluation setting.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub num_steps: usize,
    pub exit: ExitRule,
    pub decoding: Decoding,
}

impl Budget {
    /// `num_steps` fixed, no exit, no speculation, the sequential sampler.
    pub fn fixed(num_steps: usize) -> Self {
        Self { num_steps, exit: ExitRule::default(), decoding: Decoding::default() }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct EvalResult {
    pub problems: usize,
    pub correct: usize,
    /// Core steps summed and tokens counted at each digit position of the output (0: the first,
    /// most significant digit), over every output.
    pub steps_by_position: Vec<(usize, usize)>,
    /// The same for the end token of the outputs that stopped.
    pub end_token_steps: (usize, usize),
    /// Tokens speculation drafted and kept, over every output.
    pub drafts: DraftCounts,
    /// The parallel sampler's steps, over every output.
    pub waves: WaveCounts,
    /// Seconds from each output's first token to its last, summed (one output at a time: the
    /// decoding time after the prompt's pass).
    pub decode_seconds: f64,
}

impl EvalResult {
    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.problems.max(1) as f64
    }

    /// Mean core steps of the digits at each position of the answer (most significant first).
    pub fn mean_steps_by_position(&self) -> Vec<f64> {
        self.steps_by_position.iter().map(|&(steps, tokens)| steps as f64 / tokens.max(1) as f64).collect()
    }

    /// Core steps spent and tokens generated, over every output: every token is a digit at its
    /// position or a stopped output's end token.
    fn totals(&self) -> (usize, usize) {
        let all = self.steps_by_position.iter().chain([&self.end_token_steps]);
        all.fold((0, 0), |(s, t), &(steps, n)| (s + steps, t + n))
    }

    /// Core steps spent, over every output.
    pub fn steps(&self) -> usize {
        self.totals().0
    }

    /// Tokens generated, over every output.
    pub fn tokens(&self) -> usize {
        self.totals().1
    }

    /// Core steps per generated token (answer digits and the end token), over all tokens.
    pub fn mean_steps_per_token(&self) -> f64 {
        let (steps, tokens) = self.totals();
        steps as f64 / tokens.max(1) as f64
    }

    /// Share of drafted tokens that verification kept (0 without speculation).
    pub fn acceptance(&self) -> f64 {
        self.drafts.accepted as f64 / self.drafts.drafted.max(1) as f64
    }

    /// Mean core steps of the end token.
    pub fn mean_end_token_steps(&self) -> f64 {
        self.end_token_steps.0 as f64 / self.end_token_steps.1.max(1) as f64
    }
}

/// Greedy answers (initial state drawn with a per-problem seed, as a server request with `seed`
/// would) compared with the true sums: right only if the completion is exactly the sum followed by
/// an end token. The problems run batched through the scheduler, as concurrent requests would.
pub fn evaluate(
    model: &Arc<HuginnModel>,
    tokenizer: &Arc<TextTokenizer>,
    problems: &[Problem],
    chat: bool,
    budget: Budget,
) -> Result<EvalResult, RunError> {
    evaluate_in_batches(model, tokenizer, problems, chat, budget, EVAL_BATCH)
}

/// [`evaluate`] with at most `batch` problems sharing a tick (1: one at a time, as a lone client).
pub fn evaluate_in_batches(
    model: &Arc<HuginnModel>,
    tokenizer: &Arc<TextTokenizer>,
    problems: &[Problem],
    chat: bool,
    budget: Budget,
    batch: usize,
) -> Result<EvalResult, RunError> {
    let formatter = Formatter::new(tokenizer)?;
    let mut specs = Vec::with_capacity(problems.len());
    for (i, problem) in problems.iter().enumerate() {
        let mut params = GenerationParams::new(budget.num_steps);
        params.exit = budget.exit;
        params.decoding = budget.decoding;
        params.max_tokens = problem.answer().len() + 2;
        params.stop_token_ids = tokenizer.special().stop.clone();
        params.seed = i as u64;
        specs.push(JobSpec::new(formatter.prompt_ids(problem, chat)?, params));
    }
    let outcomes = Driver::new(model.clone(), tokenizer.clone(), batch).run(specs, |_, _| {})?;
    let mut correct = 0;
    let mut drafts = DraftCounts::default();
    let mut waves = WaveCounts::default();
    let mut decode_seconds = 0.0;
    let mut steps_by_position: Vec<(usize, usize)> = Vec::new();
    let mut end_token_steps = (0, 0);
    for (problem, choices) in problems.iter().zip(outcomes) {
        for out in choices {
            drafts += out.drafts();
            waves += out.waves();
            decode_seconds += out.seconds - out.first_token_seconds;
            let text = tokenizer.decode(&out.token_ids)?;
            correct += usize::from(out.finish_reason == FinishReason::Stop && text == problem.answer());
            let mut digits = out.steps_per_token.as_slice();
            if out.finish_reason == FinishReason::Stop
                && let Some((&end, rest)) = digits.split_last()
            {
                end_token_steps = (end_token_steps.0 + end, end_token_steps.1 + 1);
                digits = rest;
            }
            if steps_by_position.len() < digits.len() {
                steps_by_position.resize(digits.len(), (0, 0));
            }
            for (slot, &s) in steps_by_position.iter_mut().zip(digits) {
                *slot = (slot.0 + s, slot.1 + 1);
            }
        }
    }
    // Every token is a digit at its position or a stopped output's end token.
    Ok(EvalResult {
        problems: problems.len(),
        correct,
        steps_by_position,
        end_token_steps,
        drafts,
        waves,
        decode_seconds,
    })
}

/// Problems that share a tick in an evaluation.
const EVAL_BATCH: usize = 64;
