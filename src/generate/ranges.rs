//! The one set of ranges for generation values, whoever sets them: a request (the server names
//! the field), the settings (start-up names the key), `huginn generate` or the library (exit thresholds are
//! checked where the rule is made, `model::ExitRule::new`). Each check
//! returns what is wrong without the value's name, which the caller adds in its own terms.

pub const MAX_TEMPERATURE: f64 = 2.0;
pub const MAX_INIT_SCALE: f64 = 10.0;
/// Largest magnitude of a `logit_bias` entry.
pub const MAX_LOGIT_BIAS: f64 = 100.0;

fn within(value: f64, low: f64, high: f64) -> Result<(), String> {
    if value.is_finite() && value >= low && value <= high {
        Ok(())
    } else {
        Err(format!("must be between {low} and {high}, got {value}"))
    }
}

pub fn temperature(value: f64) -> Result<(), String> {
    within(value, 0.0, MAX_TEMPERATURE)
}

pub fn top_p(value: f64) -> Result<(), String> {
    if value > 0.0 && value <= 1.0 { Ok(()) } else { Err(format!("must be in (0, 1], got {value}")) }
}

pub fn min_p(value: f64) -> Result<(), String> {
    within(value, 0.0, 1.0)
}

/// `presence_penalty` and `frequency_penalty` (OpenAI's range).
pub fn penalty(value: f64) -> Result<(), String> {
    within(value, -2.0, 2.0)
}

pub fn repetition_penalty(value: f64) -> Result<(), String> {
    within(value, 0.01, 10.0)
}

pub fn init_scale(value: f64) -> Result<(), String> {
    within(value, 0.0, MAX_INIT_SCALE)
}

pub fn logit_bias(value: f64) -> Result<(), String> {
    within(value, -MAX_LOGIT_BIAS, MAX_LOGIT_BIAS)
}

/// A count that must let something through (`draft_tokens`, `max_wavefront`, ...).
pub fn at_least_one(value: usize) -> Result<(), String> {
    if value >= 1 { Ok(()) } else { Err("must be at least 1".into()) }
}

/// Recurrence steps per drafted token: fewer than the verification's `num_steps`.
pub fn draft_steps(value: usize, num_steps: usize) -> Result<(), String> {
    if (1..num_steps).contains(&value) {
        Ok(())
    } else {
        Err(format!("must be between 1 and num_steps - 1 ({}), got {value}", num_steps.saturating_sub(1)))
    }
}

/// Core steps per sampler step of the parallel sampler: at most `num_steps`.
pub fn inner_steps(value: usize, num_steps: usize) -> Result<(), String> {
    if (1..=num_steps).contains(&value) {
        Ok(())
    } else {
        Err(format!("must be between 1 and num_steps ({num_steps}), got {value}"))
    }
}

/// The parallel sampler's convergence threshold (a relative latent change).
pub fn freeze_threshold(value: f64) -> Result<(), String> {
    if value.is_finite() && value >= 0.0 { Ok(()) } else { Err(format!("must be a finite number >= 0, got {value}")) }
}

/// β of the parallel sampler.
pub fn state_noise(value: f64) -> Result<(), String> {
    within(value, 0.0, 1.0)
}

/// η of the parallel sampler: in [0, 1).
pub fn embed_ema(value: f64) -> Result<(), String> {
    if value.is_finite() && (0.0..1.0).contains(&value) {
        Ok(())
    } else {
        Err(format!("must be in [0, 1), got {value}"))
    }
}

/// Top alternatives per token (`logprobs`, `top_logprobs`).
pub fn top_logprobs(value: i64) -> Result<usize, String> {
    usize::try_from(value)
        .ok()
        .filter(|&k| k <= MAX_LOGPROBS)
        .ok_or_else(|| format!("must be between 0 and {MAX_LOGPROBS}, got {value}"))
}

/// Most alternatives a token may report (OpenAI's limit).
pub const MAX_LOGPROBS: usize = 20;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_inclusive_and_non_finite_values_fail() {
        assert!(temperature(0.0).is_ok() && temperature(MAX_TEMPERATURE).is_ok());
        assert!(temperature(-0.1).is_err() && temperature(f64::NAN).is_err());
        assert!(top_p(1.0).is_ok() && top_p(0.0).is_err());
        assert!(penalty(-2.0).is_ok() && penalty(2.5).is_err());
        assert!(repetition_penalty(0.0).is_err() && repetition_penalty(1.0).is_ok());
        assert!(logit_bias(-100.0).is_ok() && logit_bias(101.0).is_err());
        assert_eq!(temperature(9.0).unwrap_err(), "must be between 0 and 2, got 9");
    }
}
