//! Training recurrent-depth models from scratch on the CPU (candle autograd), and the addition task
//! the default model is trained on.

pub mod addition;
pub mod eval;
pub mod model;
pub mod optimizer;
pub mod recurrence;
pub mod trainer;

pub use trainer::{StepReport, TrainOptions, Trainer};
