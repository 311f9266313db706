//! Memory-mapped safetensors weights of a checkpoint folder: `model.safetensors`, or shards listed in
//! `model.safetensors.index.json`. Every tensor is checked by name and shape against what the
//! architecture expects, so a bad checkpoint fails with the file, tensor and both shapes.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use super::backend::{Backend, Linear};
use super::error::{ModelError, Result};

pub const SINGLE_FILE: &str = "model.safetensors";
pub const SHARD_INDEX: &str = "model.safetensors.index.json";

/// The weight files of a checkpoint, with the file each tensor lives in.
pub struct WeightFiles {
    files: Vec<(String, MmapedSafetensors)>,
    location: HashMap<String, usize>,
    /// The kernels the weights are prepared for (and the dtypes they are stored in).
    backend: Backend,
    device: Device,
}

impl WeightFiles {
    /// Opens `model.safetensors` or, when absent, the shards named by the index file, to load on
    /// `device` for `backend`.
    pub fn open(dir: &Path, backend: Backend, device: &Device) -> Result<Self> {
        let names = weight_file_names(dir)?;
        let mut files = Vec::with_capacity(names.len());
        let mut location = HashMap::new();
        for (index, name) in names.into_iter().enumerate() {
            let path = dir.join(&name);
            if !path.is_file() {
                return Err(ModelError::MissingFile { path });
            }
            // SAFETY: the file is mapped read-only; the checkpoint must not be modified while served.
            let mmap = unsafe { MmapedSafetensors::new(&path) }
                .map_err(|e| ModelError::Safetensors { file: name.clone(), message: root_cause(&e) })?;
            for (tensor, _) in mmap.tensors() {
                location.insert(tensor, index);
            }
            files.push((name, mmap));
        }
        Ok(Self { files, location, backend, device: device.clone() })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// A linear layer over `weight`, prepared for the backend's kernels.
    pub fn linear(&self, weight: Tensor) -> Result<Linear> {
        self.backend.linear(weight)
    }

    /// The embedding table `name`, in the weights' dtype.
    pub fn load_embedding(&self, name: &str, expected: &[usize]) -> Result<Tensor> {
        self.load_as(name, expected, self.backend.weights_dtype())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.location.contains_key(name)
    }

    fn file_list(&self) -> String {
        self.files.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ")
    }

    /// Loads `name`, checks its shape and converts it to the activation dtype on the model device.
    pub fn load(&self, name: &str, expected: &[usize]) -> Result<Tensor> {
        self.load_as(name, expected, self.backend.activation_dtype())
    }

    /// Like [`Self::load`], in `dtype`.
    pub fn load_as(&self, name: &str, expected: &[usize], dtype: DType) -> Result<Tensor> {
        let index = *self
            .location
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor { name: name.to_string(), files: self.file_list() })?;
        let (file, mmap) = &self.files[index];
        let view =
            mmap.get(name).map_err(|e| ModelError::Safetensors { file: file.clone(), message: root_cause(&e) })?;
        if view.shape() != expected {
            return Err(ModelError::ShapeMismatch {
                file: file.clone(),
                name: name.to_string(),
                expected: expected.to_vec(),
                found: view.shape().to_vec(),
            });
        }
        use safetensors::Dtype as S;
        if !matches!(view.dtype(), S::F32 | S::F16 | S::BF16 | S::F64) {
            return Err(ModelError::UnsupportedTensorDtype {
                file: file.clone(),
                name: name.to_string(),
                found: format!("{:?}", view.dtype()),
            });
        }
        let tensor = mmap
            .load(name, &self.device)
            .map_err(|e| ModelError::Safetensors { file: file.clone(), message: root_cause(&e) })?;
        Ok(tensor.to_dtype(dtype)?)
    }
}

/// `model.safetensors` if present, else the distinct files of the shard index's `weight_map`.
fn weight_file_names(dir: &Path) -> Result<Vec<String>> {
    if dir.join(SINGLE_FILE).is_file() {
        return Ok(vec![SINGLE_FILE.to_string()]);
    }
    let index_path = dir.join(SHARD_INDEX);
    if !index_path.is_file() {
        return Err(ModelError::MissingFile { path: dir.join(SINGLE_FILE) });
    }
    let text = read_text(&index_path)?;
    let bad = |message: String| ModelError::ShardIndex { file: SHARD_INDEX.to_string(), message };
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let map =
        json.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| bad("missing object `weight_map`".into()))?;
    let mut names = BTreeSet::new();
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| bad(format!("file of `{tensor}` is not a string")))?;
        if file.contains('/') || file.contains("..") {
            return Err(bad(format!("shard name `{file}` must be a plain file name")));
        }
        names.insert(file.to_string());
    }
    if names.is_empty() {
        return Err(bad("`weight_map` lists no files".into()));
    }
    Ok(names.into_iter().collect())
}

pub fn read_text(path: &Path) -> Result<String> {
    if !path.is_file() {
        return Err(ModelError::MissingFile { path: path.to_path_buf() });
    }
    std::fs::read_to_string(path).map_err(|e| ModelError::Io { path: path.to_path_buf(), message: e.to_string() })
}

pub fn file_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| path.display().to_string())
}

fn root_cause(e: &candle_core::Error) -> String {
    // candle wraps safetensors errors with backtraces; keep the message readable.
    let text = e.to_string();
    text.lines().next().unwrap_or(&text).to_string()
}
