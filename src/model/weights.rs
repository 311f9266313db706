//! Memory-mapped safetensors weights of a checkpoint folder: `model.safetensors`, or shards listed in
//! `model.safetensors.index.json`. Every tensor is checked by name and shape against what the
//! architecture expects, so a bad checkpoint fails with the file, tensor and both shapes.
//!
//! Tensors are read one at a time, with positioned reads straight into their buffers (no mapping of
//! the data, whose pages would count as the process's memory beside the model's), then converted
//! or packed, the source dropped at once: peak memory is the weights in their serving dtype plus
//! the largest tensor in transit.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::tensor::{Metadata, SafeTensors};

use super::backend::{Backend, Linear};
use super::error::{ModelError, Result};

pub const SINGLE_FILE: &str = "model.safetensors";
pub const SHARD_INDEX: &str = "model.safetensors.index.json";

/// One safetensors file: its header, and the file, read tensor by tensor.
struct WeightFile {
    name: String,
    file: std::fs::File,
    metadata: Metadata,
    /// Where the tensor data starts (after the header).
    data_start: usize,
}

impl WeightFile {
    fn open(dir: &Path, name: &str) -> Result<Self> {
        let path = dir.join(name);
        if !path.is_file() {
            return Err(ModelError::MissingFile { path });
        }
        let bad = |message: String| ModelError::Safetensors { file: name.to_string(), message };
        let file =
            std::fs::File::open(&path).map_err(|e| ModelError::Io { path: path.clone(), message: e.to_string() })?;
        // The header is read through a mapping (only its pages are touched) and validated once:
        // offsets inside the file, no overlaps. The data is read later, tensor by tensor.
        // SAFETY: the file is mapped read-only; the checkpoint must not be modified while loading.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::Io { path, message: e.to_string() })?;
        SafeTensors::deserialize(&mmap).map_err(|e| bad(e.to_string()))?;
        let (header, metadata) = SafeTensors::read_metadata(&mmap).map_err(|e| bad(e.to_string()))?;
        drop(mmap);
        Ok(Self { name: name.to_string(), file, metadata, data_start: 8 + header })
    }

    /// The `len` bytes at `offset` of the file, read into a buffer of `T` (positioned reads: no
    /// page of the file is mapped into the process, so none stays resident), in parts of 8 MiB
    /// on every thread.
    fn read<T: Copy + Default + Send + Sync>(&self, offset: usize, len: usize) -> std::io::Result<Vec<T>> {
        use rayon::prelude::*;
        const PART: usize = 8 << 20;
        let mut values: Vec<T> = Vec::with_capacity(len / size_of::<T>());
        values.spare_capacity_mut().par_chunks_mut(PART / size_of::<T>().max(1)).for_each(|part| {
            for slot in part {
                slot.write(T::default());
            }
        });
        // SAFETY: every element of the capacity was just written.
        unsafe { values.set_len(len / size_of::<T>()) };
        // SAFETY: the buffer holds `len` initialized bytes (plain numbers: any bit pattern is valid).
        let bytes = unsafe { std::slice::from_raw_parts_mut(values.as_mut_ptr().cast::<u8>(), len) };
        bytes
            .par_chunks_mut(PART)
            .enumerate()
            .try_for_each(|(i, part)| read_exact_at(&self.file, part, (offset + i * PART) as u64))?;
        Ok(values)
    }
}

#[cfg(unix)]
fn read_exact_at(file: &std::fs::File, buffer: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buffer, offset)
}

#[cfg(not(unix))]
fn read_exact_at(mut file: &std::fs::File, buffer: &mut [u8], offset: u64) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    file.seek(SeekFrom::Start(offset))?;
    file.read_exact(buffer)
}

/// The weight files of a checkpoint, with the file each tensor lives in.
pub struct WeightFiles {
    files: Vec<WeightFile>,
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
            let file = WeightFile::open(dir, &name)?;
            for tensor in file.metadata.tensors().into_keys() {
                location.insert(tensor, index);
            }
            files.push(file);
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

    /// The linear layer of tensor `name`, read in the weights' dtype and prepared at once.
    pub fn load_linear(&self, name: &str, expected: &[usize]) -> Result<Linear> {
        self.linear(self.load_as(name, expected, self.backend.weights_dtype())?)
    }

    /// The embedding table `name`, in the weights' dtype.
    pub fn load_embedding(&self, name: &str, expected: &[usize]) -> Result<Tensor> {
        self.load_as(name, expected, self.backend.weights_dtype())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.location.contains_key(name)
    }

    fn file_list(&self) -> String {
        self.files.iter().map(|f| f.name.as_str()).collect::<Vec<_>>().join(", ")
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
        let file = &self.files[index];
        let info = file
            .metadata
            .info(name)
            .ok_or_else(|| ModelError::MissingTensor { name: name.to_string(), files: self.file_list() })?;
        if info.shape != expected {
            return Err(ModelError::ShapeMismatch {
                file: file.name.clone(),
                name: name.to_string(),
                expected: expected.to_vec(),
                found: info.shape.clone(),
            });
        }
        use safetensors::Dtype as S;
        let stored = match info.dtype {
            S::F32 => DType::F32,
            S::F16 => DType::F16,
            S::BF16 => DType::BF16,
            S::F64 => DType::F64,
            other => {
                return Err(ModelError::UnsupportedTensorDtype {
                    file: file.name.clone(),
                    name: name.to_string(),
                    found: format!("{other:?}"),
                });
            }
        };
        let (first, last) = info.data_offsets;
        let (offset, len) = (file.data_start + first, last - first);
        let io = |e: std::io::Error| ModelError::Safetensors {
            file: file.name.clone(),
            message: format!("reading tensor `{name}`: {e}"),
        };
        let shape = info.shape.as_slice();
        let tensor = match stored {
            DType::F32 => Tensor::from_vec(file.read::<f32>(offset, len).map_err(io)?, shape, &self.device)?,
            DType::BF16 => Tensor::from_vec(file.read::<bf16>(offset, len).map_err(io)?, shape, &self.device)?,
            DType::F16 => Tensor::from_vec(file.read::<f16>(offset, len).map_err(io)?, shape, &self.device)?,
            _ => Tensor::from_vec(file.read::<f64>(offset, len).map_err(io)?, shape, &self.device)?,
        };
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
