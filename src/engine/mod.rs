//! The serving engine: jobs, the depth-level continuous-batching scheduler, workers and admission.

pub mod job;
pub mod running;
pub mod scheduler;
pub mod worker;

pub use job::{Event, ExitReason, Job, JobHandle, JobSpec, TokenLogprobs};
pub use scheduler::{Scheduler, SchedulerLimits};
pub use worker::{Engine, EngineConfig, EngineError};
