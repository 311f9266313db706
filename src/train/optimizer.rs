//! AdamW with linear warm-up and cosine decay, global gradient-norm clipping, and a state that
//! saves and loads (moments and step) so that a resumed run continues exactly.

use std::collections::HashMap;
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::model::{ModelError, Result};

#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay, applied to matrices only (not to norm weights).
    pub weight_decay: f64,
    /// Gradients are scaled down when their global L2 norm exceeds this.
    pub clip_norm: f64,
}

impl AdamWConfig {
    /// The learning rate at (0-based) step `step`.
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let progress = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
        self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

pub struct AdamW {
    cfg: AdamWConfig,
    /// (name, variable, first moment, second moment), in name order.
    params: Vec<(String, Var, Tensor, Tensor)>,
    step: usize,
}

impl AdamW {
    pub fn new(vars: &HashMap<String, Var>, cfg: AdamWConfig) -> Result<Self> {
        let mut names: Vec<&String> = vars.keys().collect();
        names.sort();
        let params = names
            .into_iter()
            .map(|name| {
                let var = vars[name].clone();
                let zeros = var.as_tensor().zeros_like()?;
                Ok((name.clone(), var, zeros.clone(), zeros))
            })
            .collect::<Result<_>>()?;
        Ok(Self { cfg, params, step: 0 })
    }

    /// Steps taken so far.
    pub fn step_count(&self) -> usize {
        self.step
    }

    /// Applies one update from `grads`; returns the gradient norm before clipping.
    pub fn step(&mut self, grads: &GradStore) -> Result<f64> {
        let mut sum_sq = 0.0f64;
        for (_, var, _, _) in &self.params {
            if let Some(g) = grads.get(var.as_tensor()) {
                sum_sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
            }
        }
        let norm = sum_sq.sqrt();
        let clip = if norm > self.cfg.clip_norm { self.cfg.clip_norm / norm } else { 1.0 };
        let lr = self.cfg.lr_at(self.step);
        self.step += 1;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let (c1, c2) = (1.0 - b1.powi(self.step as i32), 1.0 - b2.powi(self.step as i32));
        for (_, var, m, v) in &mut self.params {
            let Some(g) = grads.get(var.as_tensor()) else { continue };
            let g = (g * clip)?;
            *m = ((&*m * b1)? + (&g * (1.0 - b1))?)?;
            *v = ((&*v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let update = ((&*m / c1)? / ((&*v / c2)?.sqrt()? + self.cfg.eps)?)?;
            let w = var.as_tensor();
            let decayed = if w.rank() >= 2 { (w * (1.0 - lr * self.cfg.weight_decay))? } else { w.clone() };
            var.set(&(decayed - (update * lr)?)?)?;
        }
        Ok(norm)
    }

    /// Writes the moments and the step count to `path` (safetensors).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        for (name, _, m, v) in &self.params {
            tensors.insert(format!("m.{name}"), m.clone());
            tensors.insert(format!("v.{name}"), v.clone());
        }
        tensors.insert("step".into(), Tensor::new(&[self.step as u32], &candle_core::Device::Cpu)?);
        candle_core::safetensors::save(&tensors, path)
            .map_err(|e| ModelError::InvalidArgument(format!("{}: {e}", path.display())))
    }

    /// Restores what [`AdamW::save`] wrote.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let bad = |e: String| ModelError::InvalidArgument(format!("{}: {e}", path.display()));
        let device = self.params.first().map(|p| p.1.device().clone()).unwrap_or(candle_core::Device::Cpu);
        let tensors = candle_core::safetensors::load(path, &device).map_err(|e| bad(e.to_string()))?;
        for (name, _, m, v) in &mut self.params {
            let get = |key: String| tensors.get(&key).cloned().ok_or_else(|| bad(format!("missing {key}")));
            *m = get(format!("m.{name}"))?;
            *v = get(format!("v.{name}"))?;
        }
        let step = tensors.get("step").ok_or_else(|| bad("missing step".into()))?;
        self.step = step.to_vec1::<u32>()?.first().copied().unwrap_or(0) as usize;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warm_up_then_cosine_down_to_the_minimum() {
        let cfg = AdamWConfig {
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 10,
            total_steps: 110,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.0,
            clip_norm: 1.0,
        };
        assert!((cfg.lr_at(0) - 1e-4).abs() < 1e-12);
        assert!((cfg.lr_at(9) - 1e-3).abs() < 1e-12);
        assert!((cfg.lr_at(60) - 5.5e-4).abs() < 1e-9);
        assert!((cfg.lr_at(110) - 1e-4).abs() < 1e-12);
        assert!(cfg.lr_at(30) > cfg.lr_at(80));
    }
}
