//! Exact-match accuracy on fresh, held-out addition problems, at a given compute budget.

use rand::SeedableRng;
use rand::rngs::StdRng;
use rayon::prelude::*;

use super::addition::{Formatter, Problem, Split};
use crate::generate::{FinishReason, GenerationParams, generate};
use crate::model::{ExitRule, HuginnModel, Result};
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
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalResult {
    pub problems: usize,
    pub correct: usize,
    /// Core steps per generated token (answer digits and the end token), averaged over all tokens.
    pub mean_steps_per_token: f64,
}

impl EvalResult {
    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.problems.max(1) as f64
    }
}

/// Greedy answers (initial state drawn with a per-problem seed, as a server request with `seed`
/// would) compared with the true sums: right only if the completion is exactly the sum followed by
/// an end token.
pub fn evaluate(
    model: &HuginnModel,
    tokenizer: &TextTokenizer,
    problems: &[Problem],
    chat: bool,
    budget: Budget,
) -> Result<EvalResult> {
    let formatter = Formatter::new(tokenizer)?;
    let outcomes = problems
        .par_iter()
        .enumerate()
        .map(|(i, problem)| -> Result<(bool, usize, usize)> {
            let prompt = formatter.prompt_ids(problem, chat)?;
            let answer = problem.answer();
            let mut params = GenerationParams::new(budget.num_steps);
            params.exit = budget.exit;
            params.max_tokens = answer.len() + 2;
            params.stop_token_ids = tokenizer.special().stop.clone();
            params.seed = i as u64;
            let out = generate(model, &prompt, &params, |_| {})?;
            let text = tokenizer.decode(&out.token_ids)?;
            let right = out.finish_reason == FinishReason::Stop && text == answer;
            Ok((right, out.steps_per_token.iter().sum(), out.steps_per_token.len()))
        })
        .collect::<Result<Vec<_>>>()?;
    let correct = outcomes.iter().filter(|o| o.0).count();
    let steps: usize = outcomes.iter().map(|o| o.1).sum();
    let tokens: usize = outcomes.iter().map(|o| o.2).sum();
    Ok(EvalResult { problems: problems.len(), correct, mean_steps_per_token: steps as f64 / tokens.max(1) as f64 })
}
