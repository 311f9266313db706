//! The share of a long prompt's prefill spent in attention (`huginn bench --attention`).

use std::sync::Arc;
use std::time::Instant;

use crate::engine::{Driver, Event, JobSpec, RunError};
use crate::generate::GenerationParams;
use crate::model::{CacheStrategy, HuginnModel, attention_time};
use crate::text::TextTokenizer;

/// One prefill: its time and the part of it spent in the CPU attention kernel.
#[derive(Debug, Clone, Copy)]
pub struct PrefillTime {
    pub seconds: f64,
    pub attention_seconds: f64,
}

impl PrefillTime {
    pub fn attention_share(&self) -> f64 {
        self.attention_seconds / self.seconds
    }
}

/// Prefills a `tokens`-token prompt (distinct ids) at `num_steps` through the scheduler, as the
/// server runs it, until its first token: the time, and the attention kernel's part of it.
pub fn time_prefill(
    model: &Arc<HuginnModel>,
    tokenizer: &Arc<TextTokenizer>,
    tokens: usize,
    num_steps: usize,
) -> Result<PrefillTime, RunError> {
    let vocab = model.config().vocab_size.max(2);
    let prompt: Vec<u32> = (0..tokens).map(|i| (1 + (i * 7919) % (vocab - 1)) as u32).collect();
    let mut params = GenerationParams::new(num_steps);
    params.max_tokens = 1;
    params.init_scale = 0.0;
    params.cache = CacheStrategy::Shared(1);
    let mut driver = Driver::new(model.clone(), tokenizer.clone(), 1);
    let mut first_token = None;
    let attention_before = attention_time();
    let started = Instant::now();
    driver.run(vec![JobSpec::new(prompt, params)], |_, event| {
        if matches!(event, Event::Token { .. }) && first_token.is_none() {
            first_token = Some((started.elapsed().as_secs_f64(), attention_time()));
        }
    })?;
    let (seconds, attention_after) = first_token.unwrap_or((started.elapsed().as_secs_f64(), attention_time()));
    Ok(PrefillTime { seconds, attention_seconds: (attention_after - attention_before).as_secs_f64() })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use candle_core::{DType, Device};

    use super::*;

    #[test]
    fn a_prefill_reports_the_time_its_attention_took() {
        let dir = Path::new("tests/fixtures/huginn-tiny-ref");
        let model = Arc::new(HuginnModel::load(dir, DType::F32, &Device::Cpu).unwrap());
        let tokenizer = Arc::new(TextTokenizer::load(dir, model.config()).unwrap());
        let time = time_prefill(&model, &tokenizer, 200, 2).unwrap();
        // Other tests may run attention at the same time, so only the lower bound is exact.
        assert!(time.seconds > 0.0 && time.attention_seconds > 0.0, "{time:?}");
    }
}
