use std::time::{Duration, Instant};

use super::*;

const NUM_STEPS: usize = 12;
const FLOOR: usize = 3;

/// A synthetic worker: elastic tokens of `NUM_STEPS` steps (floor `FLOOR`) whose latency is
/// `(cap + 2)` ticks (prelude and coda) of `tick` seconds, with ±5% noise; each period's tokens
/// run at the cap the factor gave at the period's start (the controller sees its decision one
/// period later, as on a real worker).
struct Plant {
    controller: DepthController,
    now: Instant,
    noise: u64,
}

impl Plant {
    fn new(target_ms: u64) -> Self {
        let now = Instant::now();
        let targets = ElasticTargets { itl: Some(Duration::from_millis(target_ms)), queue: None };
        Self { controller: DepthController::new(targets, now), now, noise: 7 }
    }

    fn jitter(&mut self) -> f64 {
        self.noise = self.noise.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        1.0 + ((self.noise >> 33) as f64 / (1u64 << 31) as f64 - 0.5) * 0.1
    }

    /// One period at `tick` seconds a step (`None`: no load); the factor after it and the
    /// period's worst latency.
    fn period(&mut self, tick: Option<f64>) -> (f64, f64) {
        let cap = scaled_cap(NUM_STEPS, FLOOR, self.controller.factor());
        let mut worst: f64 = 0.0;
        if let Some(tick) = tick {
            for _ in 0..50 {
                let itl = (cap + 2) as f64 * tick * self.jitter();
                worst = worst.max(itl);
                self.controller.observe_itl(itl);
            }
        }
        self.now += self.controller.period;
        self.controller.update(self.now, FLOOR as f64 / NUM_STEPS as f64);
        (self.controller.factor(), worst)
    }
}

#[test]
fn an_overload_settles_inside_the_band_and_stays_there() {
    // 10 ms a tick: 140 ms a token at full depth against a 100 ms target.
    let mut plant = Plant::new(100);
    let trace: Vec<(f64, f64)> = (0..60).map(|_| plant.period(Some(0.010))).collect();
    let settled = trace.iter().position(|&(_, worst)| worst <= 0.100 * 1.06).unwrap();
    assert!(settled <= 4, "took {settled} periods: {trace:?}");
    let tail = &trace[10..];
    let (low, high) = tail.iter().fold((1.0f64, 0.0f64), |(lo, hi), &(f, _)| (lo.min(f), hi.max(f)));
    assert!(high - low <= 2.0 * RAISE_STEP + 1e-9, "the factor swings from {low} to {high}: {trace:?}");
    // Over the target only by the noise and one raise step's worth of depth, never by more.
    let worst = tail.iter().map(|&(_, w)| w).fold(0.0, f64::max);
    assert!(worst <= 0.100 * 1.2, "worst latency {worst}");
    assert!(low < 1.0, "the factor never came down");
}

#[test]
fn at_the_floor_the_factor_stops_and_recovers_when_the_load_ends() {
    // 20 ms a tick: even the floor (3 steps, 100 ms) only just meets the target.
    let mut plant = Plant::new(90);
    for _ in 0..20 {
        plant.period(Some(0.020));
    }
    let lowest = FLOOR as f64 / NUM_STEPS as f64;
    assert!((plant.controller.factor() - lowest).abs() < 1e-9, "{}", plant.controller.factor());
    // No load: back to full depth at one raise step a period.
    let periods = ((1.0 - lowest) / RAISE_STEP).ceil() as usize + 1;
    for _ in 0..periods {
        plant.period(None);
    }
    assert_eq!(plant.controller.factor(), 1.0);
}

#[test]
fn the_queue_signal_counts_the_job_still_waiting() {
    let now = Instant::now();
    let targets = ElasticTargets { itl: None, queue: Some(Duration::from_millis(100)) };
    let mut controller = DepthController::new(targets, now);
    let period = targets.period();
    assert_eq!(period, Duration::from_millis(400));
    // Nothing admitted, but the head of the queue has waited 300 ms: the factor drops.
    controller.observe_waiting(0.3);
    assert_eq!(controller.update(now + period / 2, 0.25), None, "the period is not over");
    assert_eq!(controller.update(now + period, 0.25), Some(1.0 / MAX_DECREASE));
    // Waits under the target raise it again; inside the band it holds.
    controller.observe_queue_wait(0.01);
    assert_eq!(controller.update(now + period * 2, 0.25), Some(0.5 + RAISE_STEP));
    controller.observe_queue_wait(0.09);
    assert_eq!(controller.update(now + period * 3, 0.25), None);
}

#[test]
fn off_without_targets_and_caps_keep_their_floor() {
    let now = Instant::now();
    let mut controller = DepthController::new(ElasticTargets::default(), now);
    controller.observe_itl(10.0);
    assert_eq!(controller.update(now + Duration::from_secs(10), 0.1), None);
    assert_eq!(controller.factor(), 1.0);
    assert_eq!(scaled_cap(12, 3, 0.5), 6);
    assert_eq!(scaled_cap(12, 3, 0.1), 3);
    assert_eq!(scaled_cap(12, 3, 1.0), 12);
    assert_eq!(scaled_cap(4, 8, 0.1), 4, "a floor above num_steps is num_steps");
    assert_eq!(p90(&mut [5.0, 1.0, 2.0, 3.0, 4.0, 6.0, 7.0, 8.0, 9.0, 10.0]), Some(9.0));
}
