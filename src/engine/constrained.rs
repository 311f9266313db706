//! A sequence's structured-output constraint: the mask on each row of logits it samples from,
//! and the matcher following the tokens it takes (drafts taken and rolled back under speculation).

use super::fault::SequenceFault;
use super::sequence::Sequence;
use crate::generate::constraint::Constraint;

impl Sequence {
    /// `row` (a chunk's logits) under the output's constraint: the tokens it refuses at minus
    /// infinity, so that sampling, its transforms and the reported log-probabilities all see the
    /// constrained distribution.
    pub(super) fn constrained(&mut self, mut row: Vec<f32>) -> Result<Vec<f32>, SequenceFault> {
        if let Some(constraint) = &mut self.constraint {
            constraint.allowed()?.apply(&mut row);
        }
        Ok(row)
    }

    /// The constraint takes `token` (an end-of-sequence token ends the output instead); whether
    /// it took it.
    pub(super) fn constrain_to(&mut self, token: u32) -> Result<bool, SequenceFault> {
        let ends = self.spec().params.stop_token_ids.contains(&token);
        match &mut self.constraint {
            Some(constraint) if !ends => {
                constraint.accept(token)?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// The constraint forgets the last `tokens` it took (drafts about to be verified).
    pub(super) fn unconstrain(&mut self, tokens: usize) -> Result<(), SequenceFault> {
        match &mut self.constraint {
            Some(constraint) if tokens > 0 => Ok(constraint.rollback(tokens)?),
            _ => Ok(()),
        }
    }

    /// The output's grammar is complete: nothing more may follow.
    pub(super) fn constraint_complete(&self) -> bool {
        self.constraint.as_ref().is_some_and(Constraint::must_end)
    }
}
