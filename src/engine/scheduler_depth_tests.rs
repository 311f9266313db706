//! Elastic depth in the scheduler: lowered caps and the steps they shed, the admission slots of
//! elastic jobs, a plain job's rows beside a burst of them, and the controller's factor falling
//! under load and coming back when it ends.

use std::time::{Duration, Instant};

use super::*;

fn elastic_job(s: &Scheduler, num_steps: usize, floor: usize, max_tokens: usize) -> (Job, JobHandle) {
    let mut params = GenerationParams::new(num_steps);
    params.max_tokens = max_tokens;
    params.init_scale = 0.0;
    params.cache = CacheStrategy::Shared(1);
    params.min_num_steps = Some(floor);
    let spec = JobSpec::new(PROMPT.to_vec(), params);
    let reservation = kv_reservation(s.model.config(), 4, &spec);
    Job::new(spec.validate(s.model.config()).expect("valid"), reservation)
}

/// Each token's steps, and the steps shed, once the job finished.
fn outcome(handle: &mut JobHandle) -> (Vec<usize>, Vec<u32>, Option<usize>) {
    let (mut steps, mut ids, mut shed) = (Vec::new(), Vec::new(), None);
    for event in events(handle) {
        match event {
            Event::Token { steps: s, id, .. } => {
                steps.push(s);
                ids.push(id);
            }
            Event::Finished { elastic_steps_shed, .. } => shed = Some(elastic_steps_shed),
            _ => {}
        }
    }
    (steps, ids, shed)
}

#[test]
fn elastic_tokens_take_the_lowered_cap_and_count_the_steps_shed() {
    let mut s = scheduler();
    let (plain, mut plain_events) = job(&s, 8, 4);
    let (elastic, mut elastic_events) = elastic_job(&s, 8, 3, 5);
    s.admit(plain).expect("admitted");
    s.admit(elastic).expect("admitted");
    s.set_depth_factor(0.5);
    let mut ticks = 0;
    while !s.is_idle() {
        s.tick().expect("tick");
        ticks += 1;
        if ticks == 12 {
            // Far below the floor: the floor holds.
            s.set_depth_factor(0.1);
        }
    }
    let (steps, _, shed) = outcome(&mut elastic_events);
    // The prompt runs num_steps; then 4 (factor 0.5) until the factor drops, then the floor.
    assert_eq!(steps[0], 8);
    assert!(steps[1..].iter().all(|&s| s == 4 || s == 3) && steps.contains(&3) && steps.contains(&4), "{steps:?}");
    assert_eq!(shed, Some(steps[1..].iter().map(|s| 8 - s).sum()));
    let (steps, _, shed) = outcome(&mut plain_events);
    assert_eq!((steps, shed), (vec![8; 4], Some(0)), "a plain job keeps its depth");
}

#[test]
fn a_burst_of_elastic_jobs_leaves_a_plain_job_its_rows() {
    let limits = SchedulerLimits {
        max_active_sequences: 4,
        max_kv_bytes: 1 << 30,
        max_tick_rows: 6,
        prefix_cache_bytes: 0,
        elastic: ElasticTargets::default(),
    };
    // Runs a plain job to its end (the other jobs' events read as they come, so that they keep
    // running, the first one's steps kept): its ticks, steps and ids.
    let run_plain = |s: &mut Scheduler, others: &mut Vec<JobHandle>, first_steps: &mut Vec<usize>| {
        let (plain, mut handle) = job(s, 4, 6);
        assert!(s.has_room_for(&plain), "the plain job is admitted");
        s.admit(plain).expect("admitted");
        let (mut ticks, mut steps, mut ids) = (0, Vec::new(), Vec::new());
        loop {
            s.tick().expect("tick");
            ticks += 1;
            for (i, other) in others.iter_mut().enumerate() {
                let (steps, _, _) = outcome(other);
                if i == 0 {
                    first_steps.extend(steps);
                }
            }
            let (more_steps, more_ids, shed) = outcome(&mut handle);
            steps.extend(more_steps);
            ids.extend(more_ids);
            if shed.is_some() {
                return (ticks, steps, ids);
            }
        }
    };
    let mut alone = scheduler_with(limits);
    let alone = run_plain(&mut alone, &mut Vec::new(), &mut Vec::new());

    let mut s = scheduler_with(limits);
    s.set_depth_factor(0.25);
    let mut burst = Vec::new();
    loop {
        let (job, handle) = elastic_job(&s, 8, 2, 40);
        if !s.has_room_for(&job) {
            break;
        }
        s.admit(job).expect("admitted");
        burst.push(handle);
    }
    // A quarter of a slot each: more than max_active_sequences, as many as the rows allow.
    assert_eq!(burst.len(), 6);
    // The burst's prompts prefilled: every one of them is decoding when the plain job arrives.
    let mut started = vec![false; burst.len()];
    while !started.iter().all(|&s| s) {
        s.tick().expect("tick");
        for (handle, started) in burst.iter_mut().zip(&mut started) {
            *started |= !outcome(handle).0.is_empty();
        }
    }
    let mut steps = Vec::new();
    let beside = run_plain(&mut s, &mut burst, &mut steps);
    assert_eq!(beside, alone, "the plain job's ticks, steps and ids");
    // The burst did run beside it, at its lowered depth.
    assert!(steps.len() > 1 && steps[1..].iter().all(|&s| s == 2), "{steps:?}");
}

#[test]
fn the_factor_falls_under_load_and_recovers_when_it_ends() {
    let limits = SchedulerLimits {
        max_active_sequences: 8,
        max_kv_bytes: 1 << 30,
        max_tick_rows: 0,
        prefix_cache_bytes: 0,
        // A target no token meets.
        elastic: ElasticTargets { itl: Some(Duration::from_micros(1)), queue: None },
    };
    let mut s = scheduler_with(limits);
    let (job, handle) = elastic_job(&s, 8, 2, 400);
    s.admit(job).expect("admitted");
    let started = Instant::now();
    let mut handle = handle;
    while s.depth_factor() > 0.25 + 1e-9 && started.elapsed() < Duration::from_secs(20) {
        s.tick().expect("tick");
        events(&mut handle);
    }
    assert!((s.depth_factor() - 0.25).abs() < 1e-9, "the factor stops at the floor: {}", s.depth_factor());
    // The load ends (its client goes): idle ticks raise the factor back to 1.
    drop(handle);
    let started = Instant::now();
    while s.depth_factor() < 1.0 && started.elapsed() < Duration::from_secs(20) {
        s.tick().expect("tick");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(s.depth_factor(), 1.0);
}
