//! What can go wrong inside one sequence (as opposed to the pass that serves every sequence): its
//! own tensor work, its text, or a broken engine invariant. Such a fault fails that sequence's job
//! and no other; only a failed pass restarts the worker.

use crate::model::ModelError;

#[derive(Debug, thiserror::Error)]
pub enum SequenceFault {
    /// The sequence's own tensor or text work failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The output's constraint failed (a mask that could not be computed, a token it refused).
    #[error("structured output: {0}")]
    Constraint(#[from] crate::generate::constraint::ConstraintError),
    /// The engine reached a state it should never reach (a bug, reported rather than guessed past).
    #[error("engine invariant broken: {0}")]
    Invariant(&'static str),
}

impl From<candle_core::Error> for SequenceFault {
    fn from(e: candle_core::Error) -> Self {
        Self::Model(e.into())
    }
}
