//! The engine: jobs, the depth-level continuous-batching scheduler (the one token loop), the
//! workers and admission that serve it, and the driver that runs it on the caller's thread.

mod constrained;
pub mod decoder;
mod depth;
pub mod driver;
pub mod elastic;
pub mod fault;
pub mod job;
pub mod prefix;
pub mod running;
pub mod scheduler;
pub mod sequence;
pub mod shared;
pub mod wavefront;
pub mod worker;

pub use driver::{Completion, Driver, RunError};
pub use elastic::ElasticTargets;
pub use fault::SequenceFault;
pub use job::{
    DraftCounts, EngineFailure, Event, ExitReason, Job, JobHandle, JobSpec, StrategyCounts, TokenLogprobs, ValidJob,
    WaveCounts,
};
pub use scheduler::{Scheduler, SchedulerLimits};
pub use worker::{Engine, EngineConfig, EngineError};
