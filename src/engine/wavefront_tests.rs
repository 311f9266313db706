use candle_core::{Device, Tensor};

use super::*;

/// Rows for `positions`, each filled with `value(position)`.
fn rows(positions: std::ops::Range<usize>, value: impl Fn(usize) -> f32) -> Tensor {
    let data: Vec<f32> = positions.clone().flat_map(|p| [value(p); 4]).collect();
    Tensor::from_vec(data, (positions.len(), 4), &Device::Cpu).unwrap()
}

fn column(t: &Tensor) -> Vec<f32> {
    t.narrow(1, 0, 1).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn overlap_follows_absolute_positions() {
    assert_eq!(Wavefront::overlap(10, 3, 10, 4), Some((0, 3)));
    assert_eq!(Wavefront::overlap(10, 3, 12, 2), Some((2, 1)));
    assert_eq!(Wavefront::overlap(10, 3, 13, 2), None, "nothing recorded from position 13 on");
    assert_eq!(Wavefront::overlap(12, 3, 10, 2), None, "a window never moves back");
}

/// Every position's state is the same at every step (value `p + 1`), so each position seen
/// twice has changed by exactly 0. After two rows freeze the window starts two positions later:
/// a position must be compared with its own previous state. The reference's bookkeeping (states
/// recorded after cutting the frozen rows, matched as if they had not been cut) compares
/// position 12 with position 14 here, a change of 2/13, and would freeze nothing.
#[test]
fn convergence_compares_each_position_with_its_own_previous_state() {
    let state = |p: usize| p as f32 + 1.0;
    let mut wave = Wavefront::new(10);
    wave.advance(0, 3);
    let first = wave.finish_step(&rows(10..13, state), 4).unwrap();
    assert!(first.iter().all(|r| r.change.is_none() && r.steps == 4), "{first:?}");

    wave.advance(2, 3);
    assert_eq!((wave.start(), wave.steps()), (12, &[4, 0, 0][..]));
    let second = wave.finish_step(&rows(12..15, state), 4).unwrap();
    assert_eq!(second[0], RowStatus { steps: 8, change: Some(0.0) }, "position 12 against itself");
    assert_eq!((second[1].change, second[2].change), (None, None), "positions 13 and 14 are new");

    // A position whose state moved: 13 goes from 14 to 28 (change |28 - 14| / 28 = 0.5).
    wave.advance(0, 3);
    let third = wave.finish_step(&rows(12..15, |p| if p == 13 { 28.0 } else { state(p) }), 4).unwrap();
    assert_eq!(third[0].change, Some(0.0));
    assert!((third[1].change.unwrap() - 0.5).abs() < 1e-6, "{third:?}");
    assert_eq!(third.iter().map(|r| r.steps).collect::<Vec<_>>(), vec![12, 8, 8]);
}

#[test]
fn injections_mix_with_the_same_positions_previous_ones() {
    let mut wave = Wavefront::new(10);
    wave.advance(0, 3);
    let first = wave.mix_injection(&rows(10..13, |p| p as f32), 0.25).unwrap();
    assert_eq!(column(&first), vec![10.0, 11.0, 12.0], "nothing to mix with yet");
    wave.advance(1, 3);
    let second = wave.mix_injection(&rows(11..14, |p| 2.0 * p as f32), 0.25).unwrap();
    // Positions 11 and 12 mix 0.75 of the new value with 0.25 of their old one; 13 is new.
    assert_eq!(column(&second), vec![0.75 * 22.0 + 0.25 * 11.0, 0.75 * 24.0 + 0.25 * 12.0, 26.0]);
    let plain = wave.mix_injection(&rows(11..14, |p| p as f32), 0.0).unwrap();
    assert_eq!(column(&plain), vec![11.0, 12.0, 13.0], "ema 0 takes the new rows as they are");
}

#[test]
fn advancing_drops_frozen_rows_and_adds_new_ones_without_steps() {
    let mut wave = Wavefront::new(5);
    wave.advance(0, 4);
    wave.finish_step(&rows(5..9, |p| p as f32), 3).unwrap();
    wave.advance(3, 2);
    assert_eq!((wave.start(), wave.steps()), (8, &[3, 0][..]));
    wave.advance(1, 1);
    assert_eq!((wave.start(), wave.steps()), (9, &[0][..]));
}
