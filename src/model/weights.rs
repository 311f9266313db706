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
use super::bf16_bits::{to_bf16, widen};
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

    fn read_error(&self, tensor: &str, e: std::io::Error) -> ModelError {
        ModelError::Safetensors { file: self.name.clone(), message: format!("reading tensor `{tensor}`: {e}") }
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

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// A linear layer over `weight`, prepared for the backend's kernels.
    pub fn linear(&self, weight: Tensor) -> Result<Linear> {
        self.backend.linear(weight)
    }

    /// The linear layer of the `[out, in]` tensor `name`, prepared for the backend as it is read.
    pub fn load_linear(&self, name: &str, expected: &[usize]) -> Result<Linear> {
        self.load_linear_part(name, expected, 0..expected.get(1).copied().unwrap_or(0), 0, 1.0)
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
        let stored = self.locate(name, expected)?;
        let (file, offset, len) = (stored.file, stored.offset, stored.len);
        let io = |e: std::io::Error| file.read_error(name, e);
        let shape = expected;
        let tensor = match stored.dtype {
            DType::F32 => Tensor::from_vec(file.read::<f32>(offset, len).map_err(io)?, shape, &self.device)?,
            DType::BF16 => Tensor::from_vec(file.read::<bf16>(offset, len).map_err(io)?, shape, &self.device)?,
            DType::F16 => Tensor::from_vec(file.read::<f16>(offset, len).map_err(io)?, shape, &self.device)?,
            _ => Tensor::from_vec(file.read::<f64>(offset, len).map_err(io)?, shape, &self.device)?,
        };
        Ok(tensor.to_dtype(dtype)?)
    }

    /// The linear layer over columns `columns` of the `[n, k]` tensor `name` (`expected`: its
    /// whole shape), its first `scaled_rows` rows multiplied by `scale` (in float32, before the
    /// weights are rounded to their dtype).
    ///
    /// Where the backend packs bfloat16 rows as they come ([`Backend::packs_bf16_rows`]), the
    /// rows are read from the file a column group at a time into a buffer per thread and packed
    /// at once: the weight is never held whole in memory beside its packed form.
    pub fn load_linear_part(
        &self,
        name: &str,
        expected: &[usize],
        columns: std::ops::Range<usize>,
        scaled_rows: usize,
        scale: f32,
    ) -> Result<Linear> {
        let stored = self.locate(name, expected)?;
        let &[n, width] = expected else {
            return Err(ModelError::InvalidArgument(format!("`{name}` is not a matrix: {expected:?}")));
        };
        if columns.start > columns.end || columns.end > width {
            return Err(ModelError::InvalidArgument(format!("columns {columns:?} of `{name}` {expected:?}")));
        }
        let whole = columns == (0..width) && scaled_rows == 0;
        if !self.backend.packs_bf16_rows() || stored.dtype == DType::F64 {
            // Converted whole, as the tensor backend and float32 kernels take it.
            let mut weight = if whole { self.load_embedding(name, expected)? } else { self.load(name, expected)? };
            if scaled_rows > 0 {
                let factors: Vec<f32> = (0..n).map(|i| if i < scaled_rows { scale } else { 1.0 }).collect();
                let factors = Tensor::from_vec(factors, (n, 1), &self.device)?.to_dtype(weight.dtype())?;
                weight = weight.broadcast_mul(&factors)?;
            }
            if columns != (0..width) {
                weight = weight.narrow(1, columns.start, columns.len())?.contiguous()?;
            }
            return self.linear(weight);
        }
        let k = columns.len();
        self.backend.linear_from_bf16_rows(n, k, |first, rows| {
            read_bf16_rows(&stored, name, width, &columns, first, rows, scaled_rows, scale)
        })
    }

    /// The linear layer whose rows are those of the `[rows, k]` tensors `parts` (name, rows),
    /// stacked in order: separate projections (queries, keys, values; gate and up) run as one
    /// fused layer. Its first `scaled_rows` rows are multiplied by `scale` (in float32, before the
    /// weights are rounded to their dtype).
    pub fn load_linear_stacked(
        &self,
        parts: &[(&str, usize)],
        k: usize,
        scaled_rows: usize,
        scale: f32,
    ) -> Result<Linear> {
        if let [(name, n)] = parts {
            return self.load_linear_part(name, &[*n, k], 0..k, scaled_rows, scale);
        }
        let stored: Vec<StoredTensor<'_>> =
            parts.iter().map(|&(name, n)| self.locate(name, &[n, k])).collect::<Result<_>>()?;
        let total: usize = parts.iter().map(|&(_, n)| n).sum();
        if !self.backend.packs_bf16_rows() || stored.iter().any(|s| s.dtype == DType::F64) {
            let tensors: Vec<Tensor> =
                parts.iter().map(|&(name, n)| self.load_as(name, &[n, k], DType::F32)).collect::<Result<_>>()?;
            let mut weight = Tensor::cat(&tensors, 0)?;
            if scaled_rows > 0 {
                let factors: Vec<f32> = (0..total).map(|i| if i < scaled_rows { scale } else { 1.0 }).collect();
                weight = weight.broadcast_mul(&Tensor::from_vec(factors, (total, 1), &self.device)?)?;
            }
            return self.linear(weight.to_dtype(self.backend.weights_dtype())?);
        }
        self.backend.linear_from_bf16_rows(total, k, |first, rows| {
            // The block of rows `first..` may span several parts: each reads its share.
            let (mut row, mut offset, mut written) = (first, 0, 0);
            for ((&(name, n), part), part_start) in parts.iter().zip(&stored).zip(starts(parts)) {
                let end = part_start + n;
                let wanted = rows.len() / k.max(1) - written;
                if wanted == 0 || row >= end {
                    continue;
                }
                let count = (end - row).min(wanted);
                let local = row - part_start;
                let block = &mut rows[offset..offset + count * k];
                read_bf16_rows(part, name, k, &(0..k), local, block, scaled_rows.saturating_sub(part_start), scale)?;
                (row, offset, written) = (row + count, offset + count * k, written + count);
            }
            Ok(())
        })
    }

    /// Where tensor `name` is stored, after checking that it exists with shape `expected` and a
    /// float dtype.
    fn locate(&self, name: &str, expected: &[usize]) -> Result<StoredTensor<'_>> {
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
        let dtype = match info.dtype {
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
        Ok(StoredTensor { file, dtype, offset: file.data_start + first, len: last - first })
    }
}

/// A tensor's place in its file.
struct StoredTensor<'a> {
    file: &'a WeightFile,
    dtype: DType,
    /// Bytes from the start of the file.
    offset: usize,
    len: usize,
}

/// First row of each part in the stacked layer.
fn starts<'a>(parts: &'a [(&str, usize)]) -> impl Iterator<Item = usize> + 'a {
    parts.iter().scan(0, |next, &(_, n)| {
        let start = *next;
        *next += n;
        Some(start)
    })
}

/// Reads rows `first..` of the stored `[_, width]` tensor `name`, columns `columns`, into `rows`
/// as bfloat16 bits (whole rows of `columns.len()` values), the rows before `scaled_rows`
/// multiplied by `scale`.
#[allow(clippy::too_many_arguments)]
fn read_bf16_rows(
    stored: &StoredTensor<'_>,
    name: &str,
    width: usize,
    columns: &std::ops::Range<usize>,
    first: usize,
    rows: &mut [u16],
    scaled_rows: usize,
    scale: f32,
) -> Result<()> {
    let (file, element) = (stored.file, stored.dtype.size_in_bytes());
    let k = columns.len();
    let at = |first: usize| (stored.offset + first * width * element) as u64;
    if stored.dtype == DType::BF16 && k == width {
        // Straight into the packer's buffer, then scaled in place.
        // SAFETY: u16 has no invalid bit patterns; the byte view covers `rows` exactly.
        let bytes = unsafe { std::slice::from_raw_parts_mut(rows.as_mut_ptr().cast::<u8>(), rows.len() * 2) };
        read_exact_at(&file.file, bytes, at(first)).map_err(|e| file.read_error(name, e))?;
        if cfg!(target_endian = "big") {
            rows.iter_mut().for_each(|bits| *bits = u16::from_le(*bits));
        }
        let scaled = scaled_rows.saturating_sub(first).min(rows.len() / k.max(1));
        for bits in &mut rows[..scaled * k] {
            *bits = to_bf16(widen(*bits) * scale);
        }
        return Ok(());
    }
    let count = rows.len() / k.max(1);
    let mut bytes = vec![0u8; count * width * element];
    read_exact_at(&file.file, &mut bytes, at(first)).map_err(|e| file.read_error(name, e))?;
    for (r, row) in rows.chunks_exact_mut(k.max(1)).enumerate() {
        let factor = if first + r < scaled_rows { scale } else { 1.0 };
        let source = &bytes[(r * width + columns.start) * element..][..k * element];
        for (bits, value) in row.iter_mut().zip(source.chunks_exact(element)) {
            let value = match stored.dtype {
                DType::BF16 => bf16::from_le_bytes([value[0], value[1]]).to_f32(),
                DType::F16 => f16::from_le_bytes([value[0], value[1]]).to_f32(),
                _ => f32::from_le_bytes([value[0], value[1], value[2], value[3]]),
            };
            *bits = bf16::from_f32(value * factor).to_bits();
        }
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A `[n, k]` weight of distinct values, saved in `dtype` as tensor `w` of `model.safetensors`.
    fn checkpoint(n: usize, k: usize, dtype: DType) -> (tempfile::TempDir, Tensor) {
        let dir = tempfile::tempdir().expect("temp dir");
        let values: Vec<f32> = (0..n * k).map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 97.0).collect();
        let weight = Tensor::from_vec(values, (n, k), &Device::Cpu).and_then(|t| t.to_dtype(dtype)).expect("weight");
        candle_core::safetensors::save(
            &HashMap::from([("w".to_string(), weight.clone())]),
            dir.path().join(SINGLE_FILE),
        )
        .expect("save");
        (dir, weight)
    }

    fn outputs(linear: &Linear, k: usize) -> Vec<f32> {
        let xs: Vec<f32> = (0..3 * k).map(|i| ((i * 31 % 17) as f32 - 8.0) / 5.0).collect();
        let xs = Tensor::from_vec(xs, (3, k), &Device::Cpu).expect("input");
        linear.forward(&xs).and_then(|t| Ok(t.flatten_all()?.to_vec1::<f32>()?)).expect("forward")
    }

    /// The layer as it would be built from the whole weight in memory: scaled in float32,
    /// narrowed, then packed.
    fn packed_in_memory(
        weight: &Tensor,
        backend: Backend,
        columns: std::ops::Range<usize>,
        scaled_rows: usize,
        scale: f32,
    ) -> Linear {
        let n = weight.dim(0).expect("rows");
        let factors: Vec<f32> = (0..n).map(|i| if i < scaled_rows { scale } else { 1.0 }).collect();
        let factors = Tensor::from_vec(factors, (n, 1), &Device::Cpu).expect("factors");
        let weight = weight.to_dtype(DType::F32).and_then(|w| w.broadcast_mul(&factors)).expect("scaled");
        let weight = weight.narrow(1, columns.start, columns.len()).and_then(|w| w.contiguous()).expect("narrowed");
        backend.linear(weight).expect("packed")
    }

    #[test]
    fn streamed_packing_equals_packing_the_whole_weight() {
        // 70 rows: one whole column group of 64 and a partial one; 45 features: a partial tile step.
        let (n, k) = (70, 45);
        for dtype in [DType::BF16, DType::F32, DType::F16] {
            let (dir, weight) = checkpoint(n, k, dtype);
            for backend in [Backend::Cpu { bf16: true }, Backend::Cpu { bf16: false }] {
                let files = WeightFiles::open(dir.path(), backend, &Device::Cpu).expect("open");
                for (columns, scaled_rows, scale) in
                    [(0..k, 0, 1.0), (0..k, 65, 0.125), (5..38, 3, 0.3), (0..20, 70, 2.0)]
                {
                    let streamed =
                        files.load_linear_part("w", &[n, k], columns.clone(), scaled_rows, scale).expect("streamed");
                    let whole = packed_in_memory(&weight, backend, columns.clone(), scaled_rows, scale);
                    let width = columns.len();
                    assert_eq!(
                        outputs(&streamed, width),
                        outputs(&whole, width),
                        "{dtype:?} {backend:?} columns {columns:?}, {scaled_rows} rows scaled by {scale}"
                    );
                }
            }
        }
    }

    #[test]
    fn rows_of_a_packed_weight_are_its_stored_values() {
        let (n, k) = (70, 45);
        for (dtype, backend) in [
            (DType::BF16, Backend::Cpu { bf16: true }),
            (DType::F32, Backend::Cpu { bf16: false }),
            (DType::F32, Backend::Tensor { dtype: DType::F32 }),
        ] {
            let (dir, weight) = checkpoint(n, k, dtype);
            let files = WeightFiles::open(dir.path(), backend, &Device::Cpu).expect("open");
            let linear = files.load_linear("w", &[n, k]).expect("linear");
            let ids = [0u32, 69, 63, 64, 5, 5];
            let rows = linear.rows(&ids).and_then(|t| Ok(t.to_dtype(DType::F32)?.to_vec2::<f32>()?)).expect("rows");
            let expected = weight.to_dtype(DType::F32).and_then(|w| w.to_vec2::<f32>()).expect("weight");
            for (row, &id) in rows.iter().zip(&ids) {
                assert_eq!(row, &expected[id as usize], "{backend:?}: row {id}");
            }
            assert!(linear.rows(&[70]).is_err(), "{backend:?}: a row past the end is an error");
        }
    }
}
