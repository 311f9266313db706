//! The scheduler's state transitions, one tick at a time, on the fixture model.

use std::sync::Arc;

use candle_core::{DType, Device};

use super::*;
use crate::engine::elastic::ElasticTargets;
use crate::engine::job::{EVENTS_PER_CHOICE, EngineFailure, ExitReason, JobHandle, JobSpec};
use crate::engine::shared::kv_reservation;
use crate::generate::GenerationParams;
use crate::model::CacheStrategy;

const PROMPT: [u32; 7] = [322, 295, 326, 373, 310, 383, 86];

fn scheduler() -> Scheduler {
    scheduler_with(SchedulerLimits {
        max_active_sequences: 8,
        max_kv_bytes: 1 << 30,
        max_tick_rows: 0,
        prefix_cache_bytes: 0,
        elastic: ElasticTargets::default(),
    })
}

fn scheduler_with(limits: SchedulerLimits) -> Scheduler {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/huginn-tiny-ref");
    let model = Arc::new(HuginnModel::load(&dir, DType::F32, &Device::Cpu).expect("fixture"));
    let tokenizer = Arc::new(TextTokenizer::load(&dir, model.config()).expect("tokenizer"));
    Scheduler::new(model, tokenizer, limits, "test")
}

fn job(scheduler: &Scheduler, num_steps: usize, max_tokens: usize) -> (Job, JobHandle) {
    let mut params = GenerationParams::new(num_steps);
    params.max_tokens = max_tokens;
    params.init_scale = 0.0;
    params.cache = CacheStrategy::Shared(1);
    let spec = JobSpec::new(PROMPT.to_vec(), params);
    let reservation = kv_reservation(scheduler.model.config(), 4, &spec);
    Job::new(spec.validate(scheduler.model.config()).expect("valid"), reservation)
}

fn events(handle: &mut JobHandle) -> Vec<Event> {
    std::iter::from_fn(|| handle.events.try_recv().ok()).collect()
}

#[test]
fn a_prompt_is_one_chunk_then_each_token_one_row() {
    let mut s = scheduler();
    let (job, mut handle) = job(&s, 2, 3);
    s.admit(job).expect("admitted");
    let r = &s.running[0];
    assert!(r.is_prefill());
    assert_eq!((r.positions(), r.stage(), r.remaining()), ((0, PROMPT.len()), Stage::Prelude, PROMPT.len()));
    assert!(s.tick().expect("tick"));
    let r = &s.running[0];
    assert_eq!((r.stage(), r.steps()), (Stage::Core, (1, 2)), "the prelude and the first step in one tick");
    assert!(events(&mut handle).is_empty(), "no token before the prompt's last step");
    s.tick().expect("tick");
    let sent = events(&mut handle);
    assert!(matches!(sent.as_slice(), [Event::Token { steps: 2, exit: ExitReason::Cap, .. }]), "{sent:?}");
    let r = &s.running[0];
    assert!(!r.is_prefill());
    assert_eq!(
        (r.positions(), r.stage(), r.generated()),
        ((PROMPT.len(), 1), Stage::Prelude, 1),
        "the token is the next chunk"
    );
    for _ in 0..4 {
        s.tick().expect("tick");
    }
    let sent = events(&mut handle);
    assert_eq!(sent.iter().filter(|e| matches!(e, Event::Token { .. })).count(), 2);
    assert!(
        matches!(sent.last(), Some(Event::Finished { reason: FinishReason::Length, kv_bytes, .. }) if *kv_bytes > 0)
    );
    assert!(s.is_idle(), "a finished sequence leaves at the end of its tick");
    assert_eq!(s.totals(), Totals::default());
}

#[test]
fn a_prompt_over_the_row_budget_runs_each_step_in_pieces_beside_a_decoder() {
    let mut s = scheduler();
    let (decoder, mut decoder_handle) = job(&s, 2, 50);
    s.admit(decoder).expect("admitted");
    while events(&mut decoder_handle).is_empty() {
        s.tick().expect("tick");
    }
    // Every pass: the decoder's row first, then 2 of the prompt's 7.
    s.limits.max_tick_rows = 3;
    let (prompt, mut prompt_handle) = job(&s, 2, 2);
    s.admit(prompt).expect("admitted");
    let (mut ticks, mut seen) = (0, std::collections::BTreeSet::new());
    while events(&mut prompt_handle).is_empty() {
        s.tick().expect("tick");
        ticks += 1;
        let r = &s.running[1];
        if r.stage() == Stage::Core {
            seen.insert(r.remaining());
        }
        assert!(ticks < 40, "the prompt keeps progressing");
    }
    assert!([5, 3, 1].iter().all(|left| seen.contains(left)), "a step in pieces of 2 rows: {seen:?}");
    assert!(ticks >= 2 * PROMPT.len().div_ceil(2), "each of the 2 steps took 4 passes: {ticks} ticks");
    let tokens = events(&mut decoder_handle).iter().filter(|e| matches!(e, Event::Token { .. })).count();
    assert!(tokens.abs_diff(ticks / 2) <= 1, "the decoder never waited: {tokens} tokens in {ticks} ticks");
}

#[test]
fn prompts_share_the_rows_left_equally_the_rest_to_the_earliest() {
    // Nine prompts of 8 rows in 63: 7 each.
    let nine: Vec<(usize, usize)> = (0..9).map(|i| (i, 8)).collect();
    assert_eq!(prompt_shares(&nine, 63), (0..9).map(|i| (i, 7)).collect::<Vec<_>>());
    // One needs less than its share: the others take what it leaves.
    assert_eq!(prompt_shares(&[(0, 100), (1, 2), (2, 100)], 64), vec![(0, 31), (1, 2), (2, 31)]);
    // What does not divide evenly goes to the earliest.
    assert_eq!(prompt_shares(&[(4, 10), (7, 10)], 5), vec![(4, 3), (7, 2)]);
    // More prompts than rows: the earliest get one each.
    assert_eq!(prompt_shares(&[(0, 5), (1, 5), (2, 5)], 2), vec![(0, 1), (1, 1)]);
    // Everything fits: each takes what it needs; nothing left: nothing.
    assert_eq!(prompt_shares(&[(0, 3), (1, 4)], 64), vec![(0, 3), (1, 4)]);
    assert!(prompt_shares(&[(0, 3)], 0).is_empty());
}

#[test]
fn a_late_prompt_progresses_beside_earlier_prompts_that_fill_the_budget() {
    let mut s = scheduler();
    // Two long prefills (16 steps) that alone would take the whole budget of 14 rows.
    s.limits.max_tick_rows = 14;
    let mut early = Vec::new();
    for _ in 0..2 {
        let (job, handle) = job(&s, 16, 1);
        s.admit(job).expect("admitted");
        early.push(handle);
    }
    s.tick().expect("tick");
    let (late, mut late_handle) = job(&s, 2, 1);
    s.admit(late).expect("admitted");
    let mut ticks = 0;
    while events(&mut late_handle).is_empty() {
        s.tick().expect("tick");
        ticks += 1;
        assert!(ticks < 12, "the late prompt waited for the earlier prefills");
    }
    // A third of 14 rows: 2 passes per step of its 7 rows, 2 steps.
    assert!(ticks <= 5, "{ticks} ticks");
    assert!(early.iter_mut().all(|h| events(h).is_empty()), "the early prompts are still in prefill");
}

#[test]
fn a_sequence_whose_reader_is_behind_sits_ticks_out() {
    let mut s = scheduler();
    let (job, mut handle) = job(&s, 1, 100);
    s.admit(job).expect("admitted");
    let mut advanced = 0;
    while s.tick().expect("tick") {
        advanced += 1;
        assert!(advanced < 100, "the channel never filled");
    }
    // Paused: the channel is as full as a tick may leave it, and the sequence holds its state.
    assert!(handle.events.len() <= EVENTS_PER_CHOICE);
    assert!(!s.is_idle());
    let generated = s.running[0].generated();
    assert!(!s.tick().expect("tick"), "still paused");
    assert_eq!(s.running[0].generated(), generated);
    let read = events(&mut handle).len();
    assert!(s.tick().expect("tick"), "reading resumes it");
    assert_eq!(read, generated, "one event per token so far, none lost");
}

#[test]
fn a_cancelled_job_leaves_at_the_next_tick() {
    let mut s = scheduler();
    let (job, handle) = job(&s, 4, 10);
    s.admit(job).expect("admitted");
    assert_eq!(s.totals().sequences, 1);
    handle.cancel();
    assert!(!s.tick().expect("tick"));
    assert!(s.is_idle());
    assert_eq!(s.totals(), Totals::default());
}

#[test]
fn room_counts_slots_and_reserved_bytes_but_an_empty_scheduler_takes_anything() {
    let mut s = scheduler();
    let (mut big, _big_handle) = job(&s, 4, 10);
    big.kv_reservation = usize::MAX;
    assert!(s.has_room_for(&big), "alone, even a job past the limits runs");
    let (first, _first_handle) = job(&s, 4, 10);
    s.admit(first).expect("admitted");
    assert!(!s.has_room_for(&big), "beside others it waits");
    let (small, _small_handle) = job(&s, 4, 10);
    assert!(s.has_room_for(&small));
}

/// The token ids a job's events carry, and whether it failed.
fn outcome(handle: &mut JobHandle) -> (Vec<u32>, Option<EngineFailure>) {
    let mut ids = Vec::new();
    for event in events(handle) {
        match event {
            Event::Token { id, .. } => ids.push(id),
            Event::Error { failure } => return (ids, Some(failure)),
            _ => {}
        }
    }
    (ids, None)
}

#[test]
fn a_fault_in_one_sequence_fails_only_its_job() {
    let mut alone = scheduler();
    let (reference, mut reference_handle) = job(&alone, 3, 6);
    alone.admit(reference).expect("admitted");
    while alone.tick().expect("tick") {}
    let (expected, failure) = outcome(&mut reference_handle);
    assert_eq!((expected.len(), failure), (6, None));

    let mut s = scheduler();
    let (faulty, mut faulty_handle) = job(&s, 3, 6);
    let (healthy, mut healthy_handle) = job(&s, 3, 6);
    s.admit(faulty).expect("admitted");
    s.admit(healthy).expect("admitted");
    let (mut faulty_ids, mut healthy_ids, mut failures) = (Vec::new(), Vec::new(), Vec::new());
    let mut read = |faulty: &mut Vec<u32>, healthy: &mut Vec<u32>, failures: &mut Vec<EngineFailure>| {
        let (ids, failed) = outcome(&mut faulty_handle);
        faulty.extend(ids);
        failures.extend(failed);
        let (ids, failed) = outcome(&mut healthy_handle);
        healthy.extend(ids);
        assert_eq!(failed, None, "the healthy job never fails");
    };
    // Two tokens each, then the first sequence's next settle fails.
    while faulty_ids.len() < 2 {
        s.tick().expect("tick");
        read(&mut faulty_ids, &mut healthy_ids, &mut failures);
    }
    s.running[0].fault_at_settle = true;
    while s.tick().expect("the worker goes on") {
        read(&mut faulty_ids, &mut healthy_ids, &mut failures);
    }
    read(&mut faulty_ids, &mut healthy_ids, &mut failures);
    assert!(matches!(failures.as_slice(), [EngineFailure::Sequence(_)]), "{failures:?}");
    assert_eq!(faulty_ids.len(), 2, "nothing after the fault");
    assert!(s.is_idle(), "the failed job left, the other finished");
    assert_eq!(s.totals(), Totals::default());
    assert_eq!(healthy_ids, expected, "the other job's tokens are exactly what it produces alone");
}

#[path = "scheduler_depth_tests.rs"]
mod depth;
