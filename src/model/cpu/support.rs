//! What the CPU kernels share: their float32 input as a slice, an output buffer that the threads
//! of one op write disjoint parts of, and weight buffers that ask for huge pages.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, Layout};
use rayon::prelude::*;

/// The float32 values of a contiguous CPU input of op `op` (`what` names the input in errors).
pub fn contiguous_f32<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(values) = storage else { candle_core::bail!("{op} expects float32 {what}") };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op} expects a contiguous {what}")
    };
    Ok(&values[start..end])
}

/// The `m` rows of a matrix product's `[m, k]` float32 input.
pub fn product_rows<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
    k: usize,
) -> candle_core::Result<(&'a [f32], usize)> {
    let xs = contiguous_f32(storage, layout, op, "input")?;
    let (m, features) = layout.shape().dims2()?;
    if features != k {
        candle_core::bail!("{op}: input has {features} features, the weight {k}")
    }
    Ok((xs, m))
}

/// The output buffer, shared by the tasks of one op (each writes its own elements).
pub struct OutPtr(pub *mut f32);

// SAFETY: the tasks write disjoint elements (each user states which).
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The element `offset` floats from the start.
    ///
    /// # Safety
    /// `offset` must be inside the buffer.
    pub unsafe fn at(&self, offset: usize) -> *mut f32 {
        // SAFETY: the caller's contract.
        unsafe { self.0.add(offset) }
    }
}

/// A buffer of `len` values for packed weights, which the kernel may back with transparent huge
/// pages: every step streams all of a model's weights, and 2 MiB pages need 512 times fewer TLB
/// entries than 4 KiB ones (measured: 5-10% faster products at 16 rows).
///
/// It is filled on every thread in chunks of `chunk` values by `fill(state, index, chunk)`
/// (`state` made by `init`, once per task, for the buffers a filler reuses). The first touch of
/// each page (the kernel zeroing it) is most of the cost of a large buffer; it happens once, in
/// parallel, where the values are written, with no zeroing pass of its own.
///
/// # Safety
/// When `fill` returns `Ok`, it must have written every element of its chunk.
pub unsafe fn weight_buffer<T, S, E>(
    len: usize,
    chunk: usize,
    init: impl Fn() -> S + Sync + Send,
    fill: impl Fn(&mut S, usize, &mut [MaybeUninit<T>]) -> Result<(), E> + Sync + Send,
) -> Result<Vec<T>, E>
where
    T: Send + Sync,
    E: Send,
{
    let mut data: Vec<T> = Vec::with_capacity(len);
    #[cfg(target_os = "linux")]
    {
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096).max(1);
        let start = (data.as_ptr() as usize).next_multiple_of(page);
        let end = (data.as_ptr() as usize + len * size_of::<T>()) / page * page;
        if end > start {
            // SAFETY: only advice, on whole pages inside the allocation this Vec owns; a kernel
            // without huge pages ignores it (the result is not needed).
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
    data.spare_capacity_mut()[..len]
        .par_chunks_mut(chunk.max(1))
        .enumerate()
        .try_for_each_init(init, |state, (index, part)| fill(state, index, part))?;
    // SAFETY: the chunks cover the first `len` elements, and the caller's `fill` wrote each of them.
    unsafe { data.set_len(len) };
    Ok(data)
}

/// `len` values drawn evenly from [-bound, bound), the same for a `seed` on every run: the
/// kernels' tests' inputs.
#[cfg(test)]
pub fn test_values(len: usize, seed: u64, bound: f32) -> Vec<f32> {
    use rand::{RngExt, SeedableRng, rngs::StdRng};
    let mut rng = StdRng::seed_from_u64(seed);
    (0..len).map(|_| rng.random_range(-bound..bound)).collect()
}
