//! The K/V write of the CPU backend: new rows copied into a sequence's cache buffer in place.

use candle_core::Tensor;

use crate::model::error::Result;

/// Writes `rows` (`[n, heads, head_dim]` float32, any row and head strides) into `buffer`
/// (`[heads, capacity, head_dim]`, float32 or bfloat16, contiguous) at positions
/// `start..start + n`, in place, straight from the rows' strides (bfloat16 rounded to nearest, ties
/// to even).
pub fn write_rows(buffer: &Tensor, rows: &Tensor, start: usize) -> Result<()> {
    Ok(buffer.inplace_op2(rows, &WriteRows { start })?)
}

/// The in-place write of [`write_rows`].
struct WriteRows {
    start: usize,
}

impl candle_core::InplaceOp2 for WriteRows {
    fn name(&self) -> &'static str {
        "kv-write-rows"
    }

    fn cpu_fwd(
        &self,
        buffer: &mut candle_core::CpuStorage,
        bl: &candle_core::Layout,
        rows: &candle_core::CpuStorage,
        rl: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        let candle_core::CpuStorage::F32(rows) = rows else { candle_core::bail!("kv-write-rows expects float32 rows") };
        match buffer {
            candle_core::CpuStorage::F32(buffer) => self.write(buffer, bl, rows, rl, |x| x),
            candle_core::CpuStorage::BF16(buffer) => self.write(buffer, bl, rows, rl, half::bf16::from_f32),
            _ => candle_core::bail!("kv-write-rows expects a float32 or bfloat16 buffer"),
        }
    }
}

impl WriteRows {
    fn write<T>(
        &self,
        buffer: &mut [T],
        bl: &candle_core::Layout,
        rows: &[f32],
        rl: &candle_core::Layout,
        convert: impl Fn(f32) -> T,
    ) -> candle_core::Result<()> {
        let (heads, capacity, dim) = bl.shape().dims3()?;
        let (n, row_heads, row_dim) = rl.shape().dims3()?;
        if (row_heads, row_dim) != (heads, dim) || self.start + n > capacity || !bl.is_contiguous() {
            candle_core::bail!("kv-write-rows: {:?} rows at {} into {:?}", rl.shape(), self.start, bl.shape())
        }
        let (row_stride, head_stride) = (rl.stride()[0], rl.stride()[1]);
        for r in 0..n {
            for h in 0..heads {
                let from = rl.start_offset() + r * row_stride + h * head_stride;
                let to = bl.start_offset() + (h * capacity + self.start + r) * dim;
                for (to, from) in buffer[to..to + dim].iter_mut().zip(&rows[from..from + dim]) {
                    *to = convert(*from);
                }
            }
        }
        Ok(())
    }
}
