//! Memory-mapped safetensors weights of a checkpoint folder: `model.safetensors`, or shards listed in
//! `model.safetensors.index.json`. Every tensor is checked by name and shape against what the
//! architecture expects, so a bad checkpoint fails with the file, tensor and both shapes.
//!
//! Tensors are read one at a time: each is copied (or converted, or packed) out of the mapping, and
//! the mapping's pages of it are handed back to the kernel at once, so that loading never holds the
//! checkpoint's bytes in memory beside the model's (peak: the weights in their serving dtype plus
//! the largest tensor in transit).

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::tensor::{Metadata, SafeTensors};

use super::backend::{Backend, Linear};
use super::error::{ModelError, Result};

pub const SINGLE_FILE: &str = "model.safetensors";
pub const SHARD_INDEX: &str = "model.safetensors.index.json";

/// One mapped safetensors file and its header.
struct WeightFile {
    name: String,
    mmap: Mmap,
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
        // SAFETY: the file is mapped read-only; the checkpoint must not be modified while served.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::Io { path, message: e.to_string() })?;
        // The whole header is validated once (offsets inside the file, no overlaps).
        SafeTensors::deserialize(&mmap).map_err(|e| bad(e.to_string()))?;
        let (header, metadata) = SafeTensors::read_metadata(&mmap).map_err(|e| bad(e.to_string()))?;
        Ok(Self { name: name.to_string(), mmap, metadata, data_start: 8 + header })
    }

    /// Hands the whole pages of `bytes` (a range of this mapping) back to the kernel: they leave
    /// the process's resident memory, and would be read from the file again if touched.
    fn release(&self, bytes: &[u8]) {
        #[cfg(unix)]
        {
            // SAFETY: sysconf has no preconditions.
            let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096).max(1);
            let start = (bytes.as_ptr() as usize).next_multiple_of(page);
            let end = (bytes.as_ptr() as usize + bytes.len()) / page * page;
            if end > start {
                // SAFETY: whole pages inside this private read-only file mapping, which nothing
                // reads again without faulting them back in from the file; only advice.
                unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
            }
        }
        #[cfg(not(unix))]
        let _ = bytes;
    }
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
        let bytes =
            file.mmap.get(file.data_start + first..file.data_start + last).ok_or_else(|| ModelError::Safetensors {
                file: file.name.clone(),
                message: format!("tensor `{name}` lies outside the file"),
            })?;
        let tensor = Tensor::from_raw_buffer(bytes, stored, &info.shape, &self.device)?;
        file.release(bytes);
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
