//! Packing a column group of bfloat16 rows into the tile layout of
//! [`Bf16Panels`](super::bf16_linear::Bf16Panels): one 16 x 16 transpose of feature pairs per
//! (step, tile), done in registers with AVX2 where the CPU has it.

use std::mem::MaybeUninit;

use super::amx::TILE_FEATURES;

/// Packs one column group from its `rows` (row-major, `k` features each, at most 64 rows) into
/// `pairs` (`steps * 64 * 16` u32), writing every value of it (padding as zeros).
///
/// Line `step * 64 + tile * 16 + pair` of a group holds, for its 16 columns `tile * 16 + c`, the
/// features `step * 32 + pair * 2` and `+ 1` as u32 `c` (low half first): each (step, tile) is
/// the transpose of a 16 x 16 matrix of feature pairs, 16 rows x 64 bytes in, 1 KiB out.
pub(super) fn pack_group(pairs: &mut [MaybeUninit<u32>], rows: &[u16], k: usize, steps: usize) {
    let columns = rows.len() / k;
    for step in 0..steps {
        let first = step * TILE_FEATURES;
        for tile in 0..4 {
            let out = &mut pairs[(step * 64 + tile * 16) * 16..][..256];
            if first + TILE_FEATURES <= k && (tile + 1) * 16 <= columns {
                transpose_tile(&rows[tile * 16 * k + first..][..15 * k + TILE_FEATURES], k, out);
            } else {
                edge_tile(rows, k, columns, tile, first, out);
            }
        }
    }
}

/// A whole tile: 16 rows of 32 features (row `c` at `rows[c * stride..]`) into 16 lines of 16
/// pairs.
fn transpose_tile(rows: &[u16], stride: usize, out: &mut [MaybeUninit<u32>]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        assert!(rows.len() >= 15 * stride + TILE_FEATURES && out.len() == 256);
        // SAFETY: AVX2 is present; `rows` holds rows 0..16 of 32 values at `stride` and `out`
        // 256 values (both checked above).
        unsafe { transpose_tile_avx2(rows.as_ptr(), stride, out.as_mut_ptr().cast::<u32>()) };
        return;
    }
    transpose_tile_portable(rows, stride, out);
}

fn transpose_tile_portable(rows: &[u16], stride: usize, out: &mut [MaybeUninit<u32>]) {
    for (pair, line) in out.chunks_exact_mut(16).enumerate() {
        for (c, slot) in line.iter_mut().enumerate() {
            let row = &rows[c * stride + pair * 2..][..2];
            slot.write(u32::from(row[0]) | (u32::from(row[1]) << 16));
        }
    }
}

/// The same transpose as four 8 x 8 transposes of u32 in AVX2 registers.
///
/// # Safety
/// AVX2 must be available; `rows` must hold 16 rows of 32 u16 at `stride`, `out` 256 u32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn transpose_tile_avx2(rows: *const u16, stride: usize, out: *mut u32) {
    use std::arch::x86_64::*;
    for row_block in 0..2 {
        for pair_block in 0..2 {
            // SAFETY (all loads and stores): inside the 16 rows of 32 u16 and the 256 outputs.
            let r: [__m256i; 8] = std::array::from_fn(|i| unsafe {
                _mm256_loadu_si256(rows.add((row_block * 8 + i) * stride + pair_block * 16).cast())
            });
            let t = [
                _mm256_unpacklo_epi32(r[0], r[1]),
                _mm256_unpackhi_epi32(r[0], r[1]),
                _mm256_unpacklo_epi32(r[2], r[3]),
                _mm256_unpackhi_epi32(r[2], r[3]),
                _mm256_unpacklo_epi32(r[4], r[5]),
                _mm256_unpackhi_epi32(r[4], r[5]),
                _mm256_unpacklo_epi32(r[6], r[7]),
                _mm256_unpackhi_epi32(r[6], r[7]),
            ];
            // u[j]: pairs j (low lane) and j + 4 (high lane) of rows 0-3, u[4 + j] of rows 4-7.
            let u = [
                _mm256_unpacklo_epi64(t[0], t[2]),
                _mm256_unpackhi_epi64(t[0], t[2]),
                _mm256_unpacklo_epi64(t[1], t[3]),
                _mm256_unpackhi_epi64(t[1], t[3]),
                _mm256_unpacklo_epi64(t[4], t[6]),
                _mm256_unpackhi_epi64(t[4], t[6]),
                _mm256_unpacklo_epi64(t[5], t[7]),
                _mm256_unpackhi_epi64(t[5], t[7]),
            ];
            for j in 0..4 {
                let low = _mm256_permute2x128_si256(u[j], u[4 + j], 0x20);
                let high = _mm256_permute2x128_si256(u[j], u[4 + j], 0x31);
                unsafe {
                    _mm256_storeu_si256(out.add((pair_block * 8 + j) * 16 + row_block * 8).cast(), low);
                    _mm256_storeu_si256(out.add((pair_block * 8 + j + 4) * 16 + row_block * 8).cast(), high);
                }
            }
        }
    }
}

/// A tile at the end of the weight (fewer than 16 rows, or fewer than 32 features left): the
/// missing values are zeros.
fn edge_tile(rows: &[u16], k: usize, columns: usize, tile: usize, first: usize, out: &mut [MaybeUninit<u32>]) {
    let mut sources = [&[][..]; 16];
    for (c, source) in sources.iter_mut().enumerate() {
        if tile * 16 + c < columns {
            let row = &rows[(tile * 16 + c) * k..][..k];
            *source = &row[first..(first + TILE_FEATURES).min(k)];
        }
    }
    for (pair, line) in out.chunks_exact_mut(16).enumerate() {
        for (slot, source) in line.iter_mut().zip(&sources) {
            let lo = source.get(pair * 2).map_or(0, |&b| u32::from(b));
            let hi = source.get(pair * 2 + 1).map_or(0, |&b| u32::from(b));
            slot.write(lo | (hi << 16));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layout as documented: line `step * 64 + tile * 16 + pair`, u32 `c`.
    fn expected(rows: &[u16], k: usize, steps: usize) -> Vec<u32> {
        let columns = rows.len() / k;
        let value = |column: usize, feature: usize| {
            if column < columns && feature < k { u32::from(rows[column * k + feature]) } else { 0 }
        };
        let mut out = vec![0u32; steps * 64 * 16];
        for step in 0..steps {
            for tile in 0..4 {
                for pair in 0..16 {
                    for c in 0..16 {
                        let (column, feature) = (tile * 16 + c, step * TILE_FEATURES + pair * 2);
                        out[((step * 64 + tile * 16 + pair) * 16) + c] =
                            value(column, feature) | (value(column, feature + 1) << 16);
                    }
                }
            }
        }
        out
    }

    fn packed(rows: &[u16], k: usize, steps: usize) -> Vec<u32> {
        let mut out = vec![MaybeUninit::new(u32::MAX); steps * 64 * 16];
        pack_group(&mut out, rows, k, steps);
        // SAFETY: every value was initialized above (and overwritten by the packer).
        out.into_iter().map(|v| unsafe { v.assume_init() }).collect()
    }

    #[test]
    fn groups_pack_to_the_documented_layout_whole_and_at_the_edges() {
        // Whole tiles and steps; a partial last step; fewer than 64 and fewer than 16 rows.
        for (columns, k) in [(64usize, 96usize), (64, 80), (40, 64), (7, 33), (64, 2), (17, 1)] {
            let rows: Vec<u16> = (0..columns * k).map(|i| (i as u16).wrapping_mul(40503).wrapping_add(7)).collect();
            let steps = k.div_ceil(TILE_FEATURES);
            assert_eq!(packed(&rows, k, steps), expected(&rows, k, steps), "{columns} rows of {k}");
        }
    }

    #[test]
    fn the_register_transpose_equals_the_portable_one() {
        let k = 100;
        let rows: Vec<u16> = (0..16 * k).map(|i| (i as u16).wrapping_mul(2654).wrapping_add(3)).collect();
        for first in [0, 32, 68] {
            let tile = &rows[first..][..15 * k + TILE_FEATURES];
            let mut portable = vec![MaybeUninit::new(0u32); 256];
            transpose_tile_portable(tile, k, &mut portable);
            let mut chosen = vec![MaybeUninit::new(1u32); 256];
            transpose_tile(tile, k, &mut chosen);
            // SAFETY: both were initialized above.
            let (portable, chosen): (Vec<u32>, Vec<u32>) = unsafe {
                (portable.iter().map(|v| v.assume_init()).collect(), chosen.iter().map(|v| v.assume_init()).collect())
            };
            assert_eq!(chosen, portable, "features from {first}");
            assert_eq!(
                portable[16 + 3],
                u32::from(rows[3 * k + first + 2]) | (u32::from(rows[3 * k + first + 3]) << 16)
            );
        }
    }
}
