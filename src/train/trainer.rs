//! The training loop: batches of addition problems, a recurrence count per step drawn around the
//! model's mean, truncated backpropagation, AdamW; checkpoints in the published format.
//!
//! Every step's randomness (problems, chat or completion format, recurrence count, initial state)
//! comes from a generator seeded with `(seed, step)`, so a run is reproducible and `--resume`
//! continues exactly where the last checkpoint left off.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};

use super::addition::{Formatter, Problem, TaskFile};
use super::model::TrainModel;
use super::optimizer::{AdamW, AdamWConfig};
use super::recurrence::sample_recurrence;
use crate::checkpoint::write_metadata;
use crate::model::{HuginnConfig, ModelError, Result};
use crate::text::TextTokenizer;

/// Everything that defines a run (saved beside the checkpoint; `--resume` checks it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainOptions {
    pub model: HuginnConfig,
    pub steps: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: usize,
    pub weight_decay: f64,
    /// Operands are below 10^digits.
    pub digits: u32,
    /// A curriculum: over the first `curriculum_steps` steps the operands' largest digit count
    /// grows evenly from `start_digits` to `digits` (0: `digits` from the first step).
    #[serde(default)]
    pub curriculum_steps: usize,
    #[serde(default)]
    pub start_digits: u32,
    /// Share of steps whose batch is in the chat format.
    pub chat_fraction: f64,
    /// Cap on a step's recurrence count.
    pub max_recurrence: usize,
    pub seed: u64,
    /// Start from the weights of this checkpoint (same shape) instead of a fresh initialisation.
    #[serde(default)]
    pub init_from: Option<PathBuf>,
}

/// What one training step did.
#[derive(Debug, Clone)]
pub struct StepReport {
    pub step: usize,
    pub loss: f64,
    pub lr: f64,
    pub recurrence: usize,
    pub grad_norm: f64,
    /// Tokens in the batch (padding included).
    pub tokens: usize,
    pub seconds: f64,
}

const WEIGHTS: &str = "model.safetensors";
const OPTIMIZER: &str = "trainer_state.safetensors";
const RUN: &str = "trainer_state.json";

#[derive(Serialize, Deserialize)]
struct RunState {
    options: TrainOptions,
    step: usize,
}

pub struct Trainer {
    options: TrainOptions,
    out: PathBuf,
    model: TrainModel,
    optimizer: AdamW,
    tokenizer: TextTokenizer,
    device: Device,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> ModelError + '_ {
    move |e| ModelError::Io { path: path.to_path_buf(), message: e.to_string() }
}

impl Trainer {
    /// A new run writing to `out`, or (with `resume`) the run whose checkpoint is in `out`.
    pub fn new(options: TrainOptions, out: &Path, resume: bool) -> Result<Self> {
        let device = Device::Cpu;
        let run_file = out.join(RUN);
        let resuming = resume && run_file.exists();
        if resuming {
            let text = std::fs::read_to_string(&run_file).map_err(io(&run_file))?;
            let saved: RunState = serde_json::from_str(&text)
                .map_err(|e| ModelError::InvalidArgument(format!("{}: {e}", run_file.display())))?;
            if saved.options != options {
                return Err(ModelError::InvalidArgument(format!(
                    "--resume: the options differ from those of the run in {} (saved: {})",
                    out.display(),
                    serde_json::to_string(&saved.options).unwrap_or_default()
                )));
            }
        }
        let cfg = write_metadata(out, &options.model, DType::F32)?;
        let tokenizer = TextTokenizer::load(out, &cfg)?;
        let model = match (&options.init_from, resuming) {
            (_, true) => TrainModel::load(cfg, &out.join(WEIGHTS), &device)?,
            (Some(init), false) => TrainModel::load(cfg, &init.join(WEIGHTS), &device)?,
            (None, false) => TrainModel::new(cfg, options.seed, &device)?,
        };
        let vars = model.vars().data().lock().map_err(|_| ModelError::InvalidArgument("poisoned".into()))?.clone();
        let mut optimizer = AdamW::new(&vars, options.adamw())?;
        if resuming {
            optimizer.load(&out.join(OPTIMIZER))?;
        }
        Ok(Self { options, out: out.to_path_buf(), model, optimizer, tokenizer, device })
    }

    /// Steps done so far (non-zero after a resume).
    pub fn step(&self) -> usize {
        self.optimizer.step_count()
    }

    pub fn model(&self) -> &TrainModel {
        &self.model
    }

    /// Runs one training step.
    pub fn train_step(&mut self) -> Result<StepReport> {
        let started = Instant::now();
        let step = self.step();
        let o = &self.options;
        let mut rng = StdRng::seed_from_u64(o.seed ^ (step as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let chat = rng.random::<f64>() < o.chat_fraction;
        let formatter = Formatter::new(&self.tokenizer)?;
        let examples = (0..o.batch_size)
            .map(|_| formatter.example(&Problem::sample_mixed(o.digits_at(step), &mut rng), chat))
            .collect::<Result<Vec<_>>>()?;
        let time = examples.iter().map(|e| e.ids.len()).max().unwrap_or(1) - 1;
        let pad = self.tokenizer.special().pad.unwrap_or(0);
        let (mut inputs, mut targets, mut scored) = (Vec::new(), Vec::new(), Vec::new());
        for (b, e) in examples.iter().enumerate() {
            for t in 0..time {
                inputs.push(e.ids.get(t).copied().unwrap_or(pad));
                targets.push(e.ids.get(t + 1).copied().unwrap_or(pad));
                if e.scored.get(t).copied().unwrap_or(false) {
                    scored.push((b * time + t) as u32);
                }
            }
        }
        let batch = examples.len();
        let recurrence = sample_recurrence(o.model.mean_recurrence as f64, o.max_recurrence, &mut rng);
        let state = self.model.random_state(batch, time, &mut rng)?;
        let inputs = Tensor::from_vec(inputs, (batch, time), &self.device)?;
        let logits = self.model.forward(&inputs, &state, recurrence, o.model.mean_backprop_depth)?;
        let rows = Tensor::new(scored.as_slice(), &self.device)?;
        let logits = logits.reshape((batch * time, ()))?.index_select(&rows, 0)?;
        let targets = Tensor::from_vec(targets, batch * time, &self.device)?.index_select(&rows, 0)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &targets)?;
        let grads = loss.backward()?;
        let lr = o.adamw().lr_at(step);
        let grad_norm = self.optimizer.step(&grads)?;
        Ok(StepReport {
            step: step + 1,
            loss: loss.to_scalar::<f32>()? as f64,
            lr,
            recurrence,
            grad_norm,
            tokens: batch * time,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Writes the weights, optimizer state and run state (each file replaced atomically).
    pub fn save(&self) -> Result<()> {
        let replace = |name: &str, write: &dyn Fn(&Path) -> Result<()>| -> Result<()> {
            let tmp = self.out.join(format!(".{name}.tmp"));
            write(&tmp)?;
            std::fs::rename(&tmp, self.out.join(name)).map_err(io(&self.out))
        };
        replace(WEIGHTS, &|p| self.model.save_weights(p))?;
        replace(OPTIMIZER, &|p| self.optimizer.save(p))?;
        let state = RunState { options: self.options.clone(), step: self.step() };
        let text = serde_json::to_string_pretty(&state).map_err(|e| ModelError::InvalidArgument(e.to_string()))?;
        replace(RUN, &|p| std::fs::write(p, &text).map_err(io(p)))?;
        replace(TaskFile::NAME, &|p| TaskFile::addition(self.options.digits).write(p))
    }
}

impl TrainOptions {
    /// The operands' largest digit count at `step` (0-based), as the curriculum has it.
    pub fn digits_at(&self, step: usize) -> u32 {
        if self.curriculum_steps == 0 || step >= self.curriculum_steps {
            return self.digits;
        }
        let start = self.start_digits.clamp(1, self.digits);
        let stages = (self.digits - start + 1) as usize;
        start + (step * stages / self.curriculum_steps) as u32
    }

    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
            lr: self.lr,
            min_lr: self.min_lr,
            warmup_steps: self.warmup_steps,
            total_steps: self.steps,
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-8,
            weight_decay: self.weight_decay,
            clip_norm: 1.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_curriculum_grows_the_digits_evenly_then_holds() {
        let mut o = TrainOptions {
            model: crate::checkpoint::preset("addition").expect("preset"),
            steps: 1000,
            batch_size: 4,
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 10,
            weight_decay: 0.1,
            digits: 6,
            curriculum_steps: 0,
            start_digits: 0,
            chat_fraction: 0.25,
            max_recurrence: 32,
            seed: 0,
            init_from: None,
        };
        assert!((0..1000).all(|s| o.digits_at(s) == 6), "no curriculum: all digits at once");
        (o.curriculum_steps, o.start_digits) = (400, 3);
        let at: Vec<u32> = [0, 99, 100, 199, 200, 300, 399, 400, 999].iter().map(|&s| o.digits_at(s)).collect();
        assert_eq!(at, vec![3, 3, 4, 4, 5, 6, 6, 6, 6]);
        // A saved run from before the curriculum existed reads as one without it.
        let mut saved = serde_json::to_value(&o).expect("json");
        let fields = saved.as_object_mut().expect("object");
        fields.remove("curriculum_steps");
        fields.remove("start_digits");
        let read: TrainOptions = serde_json::from_value(saved).expect("old run state");
        assert_eq!((read.curriculum_steps, read.digits_at(0)), (0, 6));
    }
}
