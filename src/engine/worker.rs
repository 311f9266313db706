//! Model workers and admission.
//!
//! Each worker owns a model replica on one device and runs the scheduler on its own OS thread (no
//! async runtime inside). Jobs reach it through a bounded queue: when every queue is full,
//! submission fails at once (the HTTP layer answers 429). Jobs are admitted in arrival order as
//! sequence slots and K/V memory allow.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use metrics::gauge;
use tokio::sync::mpsc as async_mpsc;

use super::job::{Job, JobHandle, JobSpec};
use super::scheduler::{Scheduler, SchedulerLimits};
use crate::metrics as m;
use crate::model::HuginnModel;
use crate::text::TextTokenizer;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("the server is at capacity: every request queue is full")]
    QueueFull,
    #[error("no model worker is available")]
    Unavailable,
}

#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    /// Jobs each worker's queue holds before submissions are refused.
    pub queue_capacity: usize,
    pub limits: SchedulerLimits,
}

struct Worker {
    queue: SyncSender<Job>,
    load: Arc<Load>,
    alive: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// What a worker is doing; queued jobs plus running sequences is the dispatch key. `beat` is the
/// time (ms since the engine started) the worker last went round its loop.
#[derive(Default)]
struct Load {
    queued: AtomicUsize,
    sequences: AtomicUsize,
    beat: AtomicU64,
}

impl Load {
    fn total(&self) -> usize {
        self.queued.load(Ordering::Relaxed) + self.sequences.load(Ordering::Relaxed)
    }
}

/// A worker that has not gone round its loop for this long is not answering (a tick of a large
/// model on a CPU can take seconds, so the margin is wide).
const STALL: Duration = Duration::from_secs(60);

/// Handle to the pool of workers.
pub struct Engine {
    workers: Vec<Worker>,
    started: Instant,
}

/// Marks the worker dead when its thread ends, however it ends.
struct AliveGuard(Arc<AtomicBool>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

impl Engine {
    /// Starts one worker per model replica (one per device).
    pub fn start(models: Vec<Arc<HuginnModel>>, tokenizer: Arc<TextTokenizer>, config: EngineConfig) -> Self {
        let started = Instant::now();
        let workers = models
            .into_iter()
            .enumerate()
            .map(|(index, model)| {
                let (queue, jobs) = mpsc::sync_channel::<Job>(config.queue_capacity.max(1));
                let load = Arc::new(Load::default());
                let alive = Arc::new(AtomicBool::new(true));
                let (tokenizer, worker_load, guard) = (tokenizer.clone(), load.clone(), AliveGuard(alive.clone()));
                let thread = std::thread::Builder::new()
                    .name(format!("huginn-worker-{index}"))
                    .spawn(move || {
                        let _guard = guard;
                        run_worker(Scheduler::new(model, tokenizer, config.limits), jobs, worker_load, started);
                    })
                    .expect("spawning a worker thread");
                Worker { queue, load, alive, thread: Some(thread) }
            })
            .collect();
        Self { workers, started }
    }

    /// Queues a job on the least-loaded worker; fails at once when every queue is full.
    pub fn submit(&self, spec: JobSpec) -> Result<JobHandle, EngineError> {
        let capacity = spec.n * (spec.params.max_tokens + 3) + 8;
        let (events, receiver) = async_mpsc::channel(capacity);
        let cancelled = Arc::new(AtomicBool::new(false));
        let mut job = Job { spec, events, cancelled: cancelled.clone(), submitted: Instant::now() };
        let mut order: Vec<&Worker> = self.workers.iter().filter(|w| w.alive.load(Ordering::SeqCst)).collect();
        if order.is_empty() {
            return Err(EngineError::Unavailable);
        }
        order.sort_by_key(|w| w.load.total());
        for worker in order {
            match worker.queue.try_send(job) {
                Ok(()) => {
                    worker.load.queued.fetch_add(1, Ordering::Relaxed);
                    gauge!(m::REQUESTS_WAITING).increment(1.0);
                    return Ok(JobHandle::new(receiver, cancelled));
                }
                Err(TrySendError::Full(back)) | Err(TrySendError::Disconnected(back)) => job = back,
            }
        }
        Err(EngineError::QueueFull)
    }

    /// Every worker thread is running and went round its loop recently.
    pub fn ready(&self) -> bool {
        let now = self.started.elapsed().as_millis() as u64;
        !self.workers.is_empty()
            && self.workers.iter().all(|w| {
                w.alive.load(Ordering::SeqCst)
                    && now.saturating_sub(w.load.beat.load(Ordering::Relaxed)) < STALL.as_millis() as u64
            })
    }

    pub fn workers(&self) -> usize {
        self.workers.len()
    }
}

impl Drop for Engine {
    /// Closes the queues and waits for the workers to finish what they admitted.
    fn drop(&mut self) {
        let threads: Vec<JoinHandle<()>> = self.workers.iter_mut().filter_map(|w| w.thread.take()).collect();
        self.workers.clear();
        for thread in threads {
            let _ = thread.join();
        }
    }
}

fn run_worker(mut scheduler: Scheduler, jobs: mpsc::Receiver<Job>, load: Arc<Load>, started: Instant) {
    let mut next: Option<Job> = None;
    let mut closed = false;
    loop {
        load.beat.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
        // Admit queued jobs in order while they fit.
        loop {
            if next.is_none() && !closed {
                next = if scheduler.is_idle() {
                    match jobs.recv_timeout(Duration::from_millis(100)) {
                        Ok(job) => Some(job),
                        Err(RecvTimeoutError::Timeout) => None,
                        Err(RecvTimeoutError::Disconnected) => {
                            closed = true;
                            None
                        }
                    }
                } else {
                    match jobs.try_recv() {
                        Ok(job) => Some(job),
                        Err(TryRecvError::Empty) => None,
                        Err(TryRecvError::Disconnected) => {
                            closed = true;
                            None
                        }
                    }
                };
            }
            match next.take() {
                Some(job) if job.is_cancelled() || scheduler.has_room_for(&job) => {
                    gauge!(m::REQUESTS_WAITING).decrement(1.0);
                    load.queued.fetch_sub(1, Ordering::Relaxed);
                    if !job.is_cancelled() {
                        let admitted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| scheduler.admit(job)));
                        if admitted.is_err() {
                            tracing::error!("panic while admitting a job; its client gets a closed stream");
                        }
                    }
                }
                Some(job) => {
                    next = Some(job);
                    break;
                }
                None => break,
            }
        }
        if closed && next.is_none() && scheduler.is_idle() {
            return;
        }
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| scheduler.tick()));
        if outcome.is_err() {
            scheduler.fail_all("internal error in the model worker");
        }
        load.sequences.store(scheduler.sequences(), Ordering::Relaxed);
    }
}
