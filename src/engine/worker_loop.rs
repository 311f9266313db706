//! A worker's thread: the loop that admits queued jobs in order and ticks the scheduler, and the
//! supervisor that restarts it with a fresh scheduler after a fault (the model stays loaded).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant};

use metrics::{counter, gauge};

use super::super::job::Job;
use super::super::scheduler::{Scheduler, Totals};
use super::{EngineConfig, MAX_BACKOFF, STABLE, WorkerShared};
use crate::metrics as m;
use crate::model::HuginnModel;
use crate::text::TextTokenizer;

/// Why a worker's loop returned.
enum Stop {
    /// The queue closed and the admitted work is done.
    Closed,
    /// A panic or model error: the in-flight requests were failed; `next` is the queued job the
    /// worker had taken but not admitted yet.
    Fault { message: String, next: Option<Box<Job>> },
}

/// Runs a worker's loop, restarting it with a fresh scheduler (the model stays loaded) after each
/// fault; `/ready` fails while it is down.
#[allow(clippy::too_many_arguments)]
pub(super) fn supervise(
    model: &Arc<HuginnModel>,
    tokenizer: &Arc<TextTokenizer>,
    config: EngineConfig,
    threads: usize,
    jobs: mpsc::Receiver<Job>,
    shared: &Arc<WorkerShared>,
    started: Instant,
    up: mpsc::Sender<()>,
) {
    let mut up = Some(up);
    let name = std::thread::current().name().unwrap_or("huginn-worker").to_string();
    let mut delay = config.restart_backoff;
    let mut next = None;
    // The worker's own compute threads. Its model steps run on one of them (`install`), so that
    // the serial parts of a step and the parallel kernels share the same threads: no third thread
    // handing every kernel call to the pool and waiting for it.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name({
            let name = name.clone();
            move |i| format!("{name}-compute-{i}")
        })
        .build()
        .map_err(|e| tracing::warn!("no dedicated compute threads ({e}); using the global pool"))
        .ok();
    loop {
        let reporter = shared.clone();
        let scheduler = Scheduler::new(model.clone(), tokenizer.clone(), config.limits, &shared.label)
            .with_reporter(Box::new(move |totals| reporter.publish(totals)));
        let since = Instant::now();
        shared.up.store(true, Ordering::SeqCst);
        if let Some(up) = up.take() {
            let _ = up.send(());
        }
        let stop = run_worker(scheduler, &jobs, shared, started, next.take(), pool.as_ref());
        shared.up.store(false, Ordering::SeqCst);
        shared.publish(Totals::default());
        match stop {
            Stop::Closed => return,
            Stop::Fault { message, next: held } => {
                next = held.map(|job| *job);
                if since.elapsed() >= STABLE {
                    delay = config.restart_backoff;
                }
                shared.restarts.fetch_add(1, Ordering::Relaxed);
                counter!(m::WORKER_RESTARTS).increment(1);
                tracing::error!(worker = %name, %message, "worker failed; restarting in {delay:?}");
                std::thread::sleep(delay);
                delay = (delay * 2).min(MAX_BACKOFF);
            }
        }
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

/// Runs `work` on the compute threads when there are some.
fn on_pool<T: Send>(pool: Option<&rayon::ThreadPool>, work: impl FnOnce() -> T + Send) -> T {
    match pool {
        Some(pool) => pool.install(work),
        None => work(),
    }
}

fn run_worker(
    mut scheduler: Scheduler,
    jobs: &mpsc::Receiver<Job>,
    shared: &WorkerShared,
    started: Instant,
    mut next: Option<Job>,
    pool: Option<&rayon::ThreadPool>,
) -> Stop {
    let mut closed = false;
    loop {
        shared.beat.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
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
                    let reservation = job.kv_reservation;
                    // The job leaves the queue's count only once it counts as running, so that
                    // `in_flight` (what a drain waits for) never reads zero in between.
                    let leave_queue = || {
                        shared.queued.fetch_sub(1, Ordering::SeqCst);
                        shared.queued_kv.fetch_sub(reservation, Ordering::SeqCst);
                        shared.changed.notify_waiters();
                    };
                    if job.is_cancelled() {
                        leave_queue();
                    } else {
                        let admitted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            on_pool(pool, || scheduler.admit(job))
                        }));
                        shared.publish(scheduler.totals());
                        leave_queue();
                        if let Ok(Err(e)) = &admitted {
                            tracing::warn!("a job failed to start: {e}");
                        }
                        if let Err(payload) = admitted {
                            let message = format!("internal error in the model worker: {}", panic_message(&*payload));
                            // Down before its clients hear of the fault, so that `/ready` agrees.
                            shared.up.store(false, Ordering::SeqCst);
                            scheduler.fail_all(&message);
                            return Stop::Fault { message, next: None };
                        }
                    }
                }
                Some(job) => {
                    scheduler.observe_waiting(job.submitted.elapsed().as_secs_f64());
                    next = Some(job);
                    break;
                }
                None => break,
            }
        }
        if closed && next.is_none() && scheduler.is_idle() {
            return Stop::Closed;
        }
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            if shared.inject_fault.swap(false, Ordering::SeqCst) {
                panic!("injected fault (drill)");
            }
            on_pool(pool, || scheduler.tick())
        }));
        let failure = match outcome {
            Ok(Ok(true)) => None,
            Ok(Ok(false)) => {
                // Every running sequence waits for its reader: no busy loop meanwhile.
                if !scheduler.is_idle() {
                    std::thread::sleep(Duration::from_millis(1));
                }
                None
            }
            Ok(Err(e)) => Some(format!("model error in the worker: {e}")),
            Err(payload) => Some(format!("internal error in the model worker: {}", panic_message(&*payload))),
        };
        if let Some(message) = failure {
            // Down before its clients hear of the fault, so that `/ready` agrees.
            shared.up.store(false, Ordering::SeqCst);
            scheduler.fail_all(&message);
            return Stop::Fault { message, next: next.map(Box::new) };
        }
        shared.publish(scheduler.totals());
        shared.depth_factor.store(scheduler.depth_factor().to_bits(), Ordering::Relaxed);
    }
}
