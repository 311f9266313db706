//! A long prompt arriving while other requests stream: how much it stalls them, and how long it
//! waits for its own first token, under a row budget per tick (`engine.max_tick_rows`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::load::{engine_with_budget, queue, spec};
use crate::engine::Event;
use crate::model::HuginnModel;
use crate::text::TextTokenizer;

/// What one run measured.
#[derive(Debug, Clone)]
pub struct Interference {
    /// Rows per pass (0: unlimited).
    pub budget: usize,
    /// The streams' median gap between tokens before the long prompt arrived.
    pub median_gap: f64,
    /// Their longest gap overlapping the long prompt's prefill.
    pub worst_gap: f64,
    /// The long prompt's time to first token.
    pub ttft: f64,
}

impl Interference {
    pub fn stall(&self) -> f64 {
        self.worst_gap / self.median_gap
    }
}

/// `streams` requests decode at `num_steps`; once each has `warmup` tokens, a prompt of
/// `prompt_len` tokens arrives (same `num_steps`, one token). With `streams` 0 it runs alone.
pub fn long_prompt(
    model: &Arc<HuginnModel>,
    tokenizer: &Arc<TextTokenizer>,
    budget: usize,
    streams: usize,
    num_steps: usize,
    prompt_len: usize,
    warmup: usize,
) -> Interference {
    let engine = engine_with_budget(model.clone(), tokenizer.clone(), 64, budget);
    let stop = AtomicBool::new(false);
    let warm = AtomicUsize::new(0);
    let started = Instant::now();
    let long: Vec<u32> = (0..prompt_len).map(|i| (100 + i * 7 % 20000) as u32).collect();
    let stream_room = model.config().block_size.saturating_sub(8);
    let (times, ttft, window) = std::thread::scope(|scope| {
        let (stop, warm, engine) = (&stop, &warm, &engine);
        let clients: Vec<_> = (0..streams)
            .map(|c| {
                scope.spawn(move || {
                    let mut times = Vec::new();
                    let Some(mut handle) = queue(engine, spec(&[84 + c as u32, 104, 101, 32], num_steps, stream_room))
                    else {
                        return times;
                    };
                    while let Some(event) = handle.events.blocking_recv() {
                        match event {
                            Event::Token { .. } => {
                                times.push(started.elapsed().as_secs_f64());
                                if times.len() == warmup {
                                    warm.fetch_add(1, Ordering::SeqCst);
                                }
                            }
                            Event::Finished { .. } | Event::Error { .. } => break,
                            _ => {}
                        }
                        if stop.load(Ordering::Relaxed) {
                            handle.cancel();
                            break;
                        }
                    }
                    times
                })
            })
            .collect();
        // Every stream has its warm-up tokens (their gaps are the baseline): the long prompt comes.
        let deadline = Instant::now() + Duration::from_secs(300);
        while warm.load(Ordering::SeqCst) < streams && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        let mut ttft = f64::NAN;
        let arrived = started.elapsed().as_secs_f64();
        if let Some(mut handle) = queue(engine, spec(&long, num_steps, 1)) {
            let submitted = Instant::now();
            while let Some(event) = handle.events.blocking_recv() {
                if matches!(event, Event::Token { .. }) {
                    ttft = submitted.elapsed().as_secs_f64();
                }
                if matches!(event, Event::Finished { .. } | Event::Error { .. }) {
                    break;
                }
            }
        }
        let answered = started.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        let times: Vec<Vec<f64>> = clients.into_iter().map(|c| c.join().unwrap_or_default()).collect();
        (times, ttft, (arrived, answered))
    });
    let (mut before, mut during) = (Vec::new(), Vec::new());
    for stream in &times {
        for pair in stream.windows(2) {
            let gap = pair[1] - pair[0];
            if pair[1] <= window.0 {
                before.push(gap);
            } else if pair[0] < window.1 {
                during.push(gap);
            }
        }
    }
    before.sort_by(f64::total_cmp);
    let median_gap = before.get(before.len() / 2).copied().unwrap_or(f64::NAN);
    let worst_gap = during.iter().copied().fold(0.0, f64::max);
    Interference { budget, median_gap, worst_gap, ttft }
}
