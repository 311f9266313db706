//! Sequential decoding: each chunk is one token (the first is the prompt), iterated up to
//! `num_steps` (or its exit criterion), its token sampled from the coda's last row.

use super::{AfterToken, Decoder, Sequence, SequenceFault, TextTokenizer};
use crate::engine::sequence::Emitted;
use crate::generate::FinishReason;

pub struct Sequential;

impl Decoder for Sequential {
    fn settle(
        &mut self,
        seq: &mut Sequence,
        tokenizer: &TextTokenizer,
        limit: usize,
    ) -> Result<AfterToken, SequenceFault> {
        Ok(match emit_sampled(seq, tokenizer, limit)? {
            Some(after) => after,
            None => {
                seq.start_next_token();
                AfterToken::Continues
            }
        })
    }
}

/// Samples the chunk's token from its last row's logits and emits it: `None` when the choice
/// goes on (the caller sets up its next chunk), else how it ended. Every strategy emits its
/// plain tokens (a prompt's first token, a token no speculative round fits) through this.
pub(super) fn emit_sampled(
    seq: &mut Sequence,
    tokenizer: &TextTokenizer,
    limit: usize,
) -> Result<Option<AfterToken>, SequenceFault> {
    let exit = seq.exit_reason();
    let steps = seq.chunk.step;
    if seq.prefill && seq.spec().params.continuous_compute() {
        seq.chunk.state = seq.chunk.state.narrow(0, seq.chunk.len - 1, 1)?;
    }
    if seq.spec().params.max_tokens == 0 {
        // Prompt log-probabilities (or logits) only.
        return Ok(Some(AfterToken::Finishes(FinishReason::Length)));
    }
    let raw = seq.take_logits()?;
    let mut logits = raw.clone();
    let token = seq.sampler.sample(&mut logits, &seq.context);
    seq.push_token(tokenizer, Emitted { token, raw: &raw, steps, exit, more: false }, limit)
}
