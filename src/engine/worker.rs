//! Model workers and admission.
//!
//! Each worker owns a model replica on one device (workers on the same device share it) and runs
//! the scheduler on its own OS thread (no async runtime inside), with its own share of the CPU's
//! compute threads. A job goes to the least-loaded live worker (K/V bytes reserved by its running
//! and queued jobs, then its sequences) through that worker's bounded queue: when every queue is
//! full, submission fails at once (the HTTP layer answers 429). Jobs are admitted in arrival order
//! as sequence slots and K/V memory allow. A worker's fault fails only its own requests.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use metrics::{counter, gauge};

use super::job::{Job, JobHandle, JobSpec, ValidJob};
use super::scheduler::{SchedulerLimits, Totals};
use super::shared::kv_reservation;
use crate::generate::FieldError;
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
    /// Delay before a failed worker restarts; doubles while it keeps failing (at most 30 s).
    pub restart_backoff: Duration,
}

struct Worker {
    queue: SyncSender<Job>,
    shared: Arc<WorkerShared>,
    model: Arc<HuginnModel>,
    thread: Option<JoinHandle<()>>,
}

/// What a worker is doing and whether it is up; shared between its thread and the engine.
/// K/V bytes reserved (queued and running jobs), then queued jobs plus running sequences, is the
/// dispatch key; `beat` is the time (ms since the engine started) the worker last went round its
/// loop.
#[derive(Default)]
struct WorkerShared {
    /// The worker's metric label (its index).
    label: String,
    queued: AtomicUsize,
    sequences: AtomicUsize,
    kv_bytes: AtomicUsize,
    /// K/V reservations of the jobs in its queue, and of its running sequences.
    queued_kv: AtomicUsize,
    running_kv: AtomicUsize,
    beat: AtomicU64,
    /// Iterating (false while starting, restarting after a fault, or after the thread ended).
    up: AtomicBool,
    /// The thread still runs (false once it has ended, however it ended).
    alive: AtomicBool,
    restarts: AtomicU64,
    /// Fault drill: the worker panics at its next tick.
    inject_fault: AtomicBool,
    /// Its elastic depth factor (the bits of an f64; 0 before it first publishes: read as 1).
    depth_factor: AtomicU64,
    /// Woken whenever the work in flight may have dropped (shared by all workers of an engine).
    changed: Arc<tokio::sync::Notify>,
}

impl WorkerShared {
    fn total(&self) -> usize {
        self.queued.load(Ordering::Relaxed) + self.sequences.load(Ordering::Relaxed)
    }

    /// The dispatch key: reserved K/V bytes, then jobs and sequences.
    fn load(&self) -> (usize, usize) {
        (self.queued_kv.load(Ordering::Relaxed) + self.running_kv.load(Ordering::Relaxed), self.total())
    }

    /// Publishes the worker's K/V bytes (the gauge's series of this worker).
    fn report_kv(&self, bytes: usize) {
        self.kv_bytes.store(bytes, Ordering::SeqCst);
        gauge!(m::KV_CACHE_BYTES, "worker" => self.label.clone()).set(bytes as f64);
    }

    /// Publishes what the worker's scheduler holds.
    fn publish(&self, totals: Totals) {
        self.sequences.store(totals.sequences, Ordering::SeqCst);
        self.running_kv.store(totals.reserved_kv, Ordering::SeqCst);
        self.report_kv(totals.kv_bytes);
        self.changed.notify_waiters();
    }
}

/// A worker that has not gone round its loop for this long is not answering (a tick of a large
/// model on a CPU can take seconds, so the margin is wide).
const STALL: Duration = Duration::from_secs(60);
/// Longest delay between restarts of a worker that keeps failing.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A worker that ran this long since its last restart starts again from the base delay.
const STABLE: Duration = Duration::from_secs(60);

/// Handle to the pool of workers.
pub struct Engine {
    workers: Vec<Worker>,
    dispatch: std::sync::Mutex<()>,
    started: Instant,
    queue_capacity: usize,
    changed: Arc<tokio::sync::Notify>,
}

/// Marks the worker down and dead when its thread ends, however it ends.
struct AliveGuard(Arc<WorkerShared>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.up.store(false, Ordering::SeqCst);
        self.0.alive.store(false, Ordering::SeqCst);
        self.0.changed.notify_waiters();
    }
}

impl Engine {
    /// Starts one worker per model replica (one per device entry; entries may share a replica)
    /// and returns once each is up (or its thread ended), so that the engine is ready when it is
    /// returned. The CPU's compute threads are split evenly between the workers.
    pub fn start(models: Vec<Arc<HuginnModel>>, tokenizer: Arc<TextTokenizer>, config: EngineConfig) -> Self {
        let started = Instant::now();
        let (up_tx, up_rx) = mpsc::channel::<()>();
        let changed = Arc::new(tokio::sync::Notify::new());
        let threads = (crate::cpu_threads::configured() / models.len().max(1)).max(1);
        let workers: Vec<Worker> = models
            .into_iter()
            .enumerate()
            .map(|(index, model)| {
                let (queue, jobs) = mpsc::sync_channel::<Job>(config.queue_capacity.max(1));
                let label = index.to_string();
                let shared = Arc::new(WorkerShared {
                    alive: AtomicBool::new(true),
                    label,
                    changed: changed.clone(),
                    ..Default::default()
                });
                // This worker's series exist from the start, at zero.
                shared.report_kv(0);
                gauge!(m::REQUESTS_RUNNING, "worker" => shared.label.clone()).increment(0.0);
                counter!(m::CORE_STEPS, "worker" => shared.label.clone()).increment(0);
                counter!(m::SEQUENCE_FAULTS, "worker" => shared.label.clone()).increment(0);
                for series in [m::PREFIX_QUERIES, m::PREFIX_HITS, m::PREFIX_EVICTIONS] {
                    counter!(series, "worker" => shared.label.clone()).increment(0);
                }
                gauge!(m::PREFIX_BYTES, "worker" => shared.label.clone()).set(0.0);
                gauge!(m::DEPTH_FACTOR, "worker" => shared.label.clone()).set(1.0);
                counter!(m::ELASTIC_STEPS_SHED).increment(0);
                let (tokenizer, guard, up) = (tokenizer.clone(), AliveGuard(shared.clone()), up_tx.clone());
                let replica = model.clone();
                let thread = std::thread::Builder::new()
                    .name(format!("huginn-worker-{index}"))
                    .spawn(move || {
                        let shared = guard.0.clone();
                        worker_loop::supervise(&replica, &tokenizer, config, threads, jobs, &shared, started, up);
                        drop(guard);
                    })
                    .expect("spawning a worker thread");
                Worker { queue, shared, model, thread: Some(thread) }
            })
            .collect();
        drop(up_tx);
        // One message per worker that came up; the channel closes early if a thread ended first.
        for _ in 0..workers.len() {
            if up_rx.recv().is_err() {
                break;
            }
        }
        Self {
            workers,
            dispatch: std::sync::Mutex::new(()),
            started,
            queue_capacity: config.queue_capacity.max(1),
            changed,
        }
    }

    /// Checks `spec` against the served model ([`JobSpec::validate`]): the only way to a job
    /// [`Self::submit`] takes.
    pub fn validate(&self, spec: JobSpec) -> Result<ValidJob, FieldError> {
        // Every worker serves the same model (one per device).
        match self.workers.first() {
            Some(worker) => spec.validate(worker.model.config()),
            None => Err(FieldError::new("model", "the engine has no worker")),
        }
    }

    /// Queues a job on the least-loaded live worker (workers that are up first, then by reserved
    /// K/V bytes, then by jobs and sequences); fails at once when every queue is full. A worker
    /// restarting after a fault still takes jobs: they wait for it in its queue.
    ///
    /// Only a [`ValidJob`] is taken; a [`JobSpec`] that was not validated does not compile:
    ///
    /// ```compile_fail
    /// fn queue(engine: &huginn::engine::Engine, spec: huginn::engine::JobSpec) {
    ///     let _ = engine.submit(spec);
    /// }
    /// ```
    pub fn submit(&self, job: ValidJob) -> Result<JobHandle, EngineError> {
        // One dispatch at a time: the choice of worker and its reservation are one step, so that
        // concurrent submissions see each other's load.
        let _dispatch = self.dispatch.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let (mut job, handle) = Job::new(job, 0);
        let mut order: Vec<&Worker> = self.workers.iter().filter(|w| w.shared.alive.load(Ordering::SeqCst)).collect();
        if order.is_empty() {
            return Err(EngineError::Unavailable);
        }
        order.sort_by_key(|w| (!w.shared.up.load(Ordering::SeqCst), w.shared.load()));
        for worker in order {
            // A place in the queue is reserved first: the job the worker holds while it waits for
            // room counts too, so at most `queue_capacity` jobs wait per worker.
            if worker.shared.queued.fetch_add(1, Ordering::SeqCst) >= self.queue_capacity {
                worker.shared.queued.fetch_sub(1, Ordering::SeqCst);
                continue;
            }
            let model = &worker.model;
            job.kv_reservation = kv_reservation(model.config(), model.kv_dtype().size_in_bytes(), &job.spec);
            worker.shared.queued_kv.fetch_add(job.kv_reservation, Ordering::SeqCst);
            match worker.queue.try_send(job) {
                Ok(()) => {
                    gauge!(m::REQUESTS_WAITING).increment(1.0);
                    return Ok(handle);
                }
                Err(TrySendError::Full(back)) | Err(TrySendError::Disconnected(back)) => {
                    worker.shared.queued.fetch_sub(1, Ordering::SeqCst);
                    worker.shared.queued_kv.fetch_sub(back.kv_reservation, Ordering::SeqCst);
                    job = back;
                }
            }
        }
        Err(EngineError::QueueFull)
    }

    /// Every worker is up and went round its loop recently.
    pub fn ready(&self) -> bool {
        let now = self.started.elapsed().as_millis() as u64;
        !self.workers.is_empty()
            && self.workers.iter().all(|w| {
                w.shared.up.load(Ordering::SeqCst)
                    && now.saturating_sub(w.shared.beat.load(Ordering::Relaxed)) < STALL.as_millis() as u64
            })
    }

    pub fn workers(&self) -> usize {
        self.workers.len()
    }

    /// The most jobs one request may submit: what the workers' queues hold when the engine is
    /// idle. A request with more could never be queued whole (a 400, not a 429).
    pub fn max_jobs_per_request(&self) -> usize {
        self.queue_capacity.saturating_mul(self.workers.len())
    }

    /// Jobs queued plus sequences running, over all workers (0 when the engine is idle).
    pub fn in_flight(&self) -> usize {
        self.workers.iter().map(|w| w.shared.total()).sum()
    }

    /// Waits until no job is queued or running on any worker (woken by the workers as work
    /// leaves them; no polling).
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            // Registered before the check, so that a change right after it still wakes us.
            notified.as_mut().enable();
            if self.in_flight() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Sequences running (admitted, not finished), over all workers.
    pub fn sequences(&self) -> usize {
        self.workers.iter().map(|w| w.shared.sequences.load(Ordering::Relaxed)).sum()
    }

    /// K/V cache bytes held by running sequences, over all workers.
    pub fn kv_bytes(&self) -> usize {
        self.workers.iter().map(|w| w.shared.kv_bytes.load(Ordering::Relaxed)).sum()
    }

    /// Per worker: elastic depth's factor (1 when elastic depth is off).
    pub fn depth_factors(&self) -> Vec<f64> {
        self.workers
            .iter()
            .map(|w| match w.shared.depth_factor.load(Ordering::Relaxed) {
                0 => 1.0,
                bits => f64::from_bits(bits),
            })
            .collect()
    }

    /// Per worker: (sequences running, K/V bytes held).
    pub fn worker_loads(&self) -> Vec<(usize, usize)> {
        self.workers
            .iter()
            .map(|w| (w.shared.sequences.load(Ordering::Relaxed), w.shared.kv_bytes.load(Ordering::Relaxed)))
            .collect()
    }

    /// Times the workers were restarted after a fault.
    pub fn restarts(&self) -> u64 {
        self.workers.iter().map(|w| w.shared.restarts.load(Ordering::Relaxed)).sum()
    }

    /// Fault drill: worker `index` panics at its next tick, failing its in-flight requests and
    /// restarting as after any fault. Returns false when there is no such worker.
    pub fn inject_fault(&self, index: usize) -> bool {
        self.workers.get(index).map(|w| w.shared.inject_fault.store(true, Ordering::SeqCst)).is_some()
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

#[path = "worker_loop.rs"]
mod worker_loop;
