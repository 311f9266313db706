//! Intel AMX (Advanced Matrix Extensions) tiles for bfloat16 products, on the x86-64 CPUs that have
//! them (Sapphire Rapids and later Xeons).
//!
//! A tile multiply-add (`tdpbf16ps`) takes up to 16 rows of 32 bfloat16 input features and 16
//! columns of weights and adds the float32 products to a 16 x 16 accumulator tile. Each row of the
//! result depends only on that row of the input: tile rows never mix, so a sequence's outputs do
//! not depend on the rows computed beside it. At 16 rows one instruction does the work of 16 AVX-512
//! multiply-adds per weight; streaming the weights from memory, not the arithmetic, then bounds a
//! product of 1 to 16 rows.
//!
//! Linux hands out the 8 KiB tile register state only on request ([`available`] asks once for the
//! whole process).

use std::sync::OnceLock;

/// Rows of an input tile (and of an accumulator tile).
pub const TILE_ROWS: usize = 16;
/// Input features per tile step: 32 bfloat16 values make a 64-byte tile row.
pub const TILE_FEATURES: usize = 32;
/// Output columns of one column group: 4 accumulator tiles of 16 float32 columns.
pub const GROUP_COLUMNS: usize = 64;
/// bfloat16 values of one column group's weights for one tile step: 4 tiles of 16 pairs x 16 columns x 2.
pub const STEP_VALUES: usize = GROUP_COLUMNS * TILE_FEATURES;

/// Whether this CPU has AMX-BF16 and the kernel lets this process use the tiles (asked once).
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(detect)
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect() -> bool {
    use std::arch::x86_64::__cpuid_count;
    if std::env::var_os("HUGINN_DISABLE_AMX").is_some() {
        return false;
    }
    let leaf7 = __cpuid_count(7, 0);
    let (amx_bf16, amx_tile) = (leaf7.edx & (1 << 22) != 0, leaf7.edx & (1 << 24) != 0);
    if !(amx_bf16 && amx_tile) {
        return false;
    }
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: asks the kernel for permission to use the tile data state; no memory is involved.
    unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect() -> bool {
    false
}

/// The tile configuration (palette 1): tiles 0-3 accumulate `rows` x 16 float32, tile 4 holds
/// `rows` x 32 bfloat16 inputs, tiles 5-7 hold 16 pairs x 16 columns of weights.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    bytes_per_row: [u16; 16],
    rows: [u8; 16],
}

impl TileConfig {
    fn new(rows: usize) -> Self {
        let mut config = Self { palette: 1, start_row: 0, reserved: [0; 14], bytes_per_row: [0; 16], rows: [0; 16] };
        for tile in 0..8 {
            config.bytes_per_row[tile] = 64;
            config.rows[tile] = if tile < 5 { rows as u8 } else { TILE_ROWS as u8 };
        }
        config
    }
}

/// `out[r][j] = sum_c x[r][c] * w[j][c]` for `rows` rows and the 64 columns of one column group.
///
/// `x` holds the rows as bfloat16, `x_stride` bytes apart, `steps * 32` features each; `weights`
/// holds the group's packed weights for those steps (`steps` blocks of [`STEP_VALUES`], each 4
/// tiles of `[16 pairs][16 columns][2]`); `out` receives the 64 float32 sums of each row,
/// `out_stride` bytes apart.
///
/// # Safety
/// [`available`] must have returned true; `1 <= rows <= 16`; `x`, `weights` and `out` must be valid
/// for the extents above.
#[cfg(target_arch = "x86_64")]
pub unsafe fn column_group(
    x: *const u16,
    x_stride: usize,
    rows: usize,
    weights: *const u16,
    steps: usize,
    out: *mut f32,
    out_stride: usize,
) {
    use std::arch::asm;
    use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
    let config = TileConfig::new(rows);
    // SAFETY: the caller guarantees AMX is enabled for this process and the pointers' extents;
    // the tile registers are not used by compiled code, so nothing else is clobbered.
    unsafe {
        asm!("ldtilecfg [{0}]", in(reg) &config as *const TileConfig, options(nostack, readonly));
        asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
        let mut w = weights as *const u8;
        for step in 0..steps {
            let a = (x as *const u8).add(step * TILE_FEATURES * 2);
            // The next step's weights, one cache line at a time (measured: ~10% faster at 1 row,
            // no change at 16). After a group's last step this is the next group's start, and
            // after the last group addresses never read: prefetches do not fault.
            let next = w.wrapping_add(STEP_VALUES * 2);
            for line in 0..STEP_VALUES * 2 / 64 {
                _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(line * 64).cast::<i8>());
            }
            asm!(
                "tileloadd tmm4, [{a} + {a_stride}*1]",
                "tileloadd tmm5, [{w} + {w_stride}*1]",
                "tdpbf16ps tmm0, tmm4, tmm5",
                "tileloadd tmm6, [{w} + {w_stride}*1 + 1024]",
                "tdpbf16ps tmm1, tmm4, tmm6",
                "tileloadd tmm7, [{w} + {w_stride}*1 + 2048]",
                "tdpbf16ps tmm2, tmm4, tmm7",
                "tileloadd tmm5, [{w} + {w_stride}*1 + 3072]",
                "tdpbf16ps tmm3, tmm4, tmm5",
                a = in(reg) a,
                a_stride = in(reg) x_stride,
                w = in(reg) w,
                w_stride = in(reg) 64usize,
                options(nostack, readonly),
            );
            w = w.add(STEP_VALUES * 2);
        }
        asm!(
            "tilestored [{o} + {s}*1], tmm0",
            "tilestored [{o} + {s}*1 + 64], tmm1",
            "tilestored [{o} + {s}*1 + 128], tmm2",
            "tilestored [{o} + {s}*1 + 192], tmm3",
            o = in(reg) out,
            s = in(reg) out_stride,
            options(nostack),
        );
    }
}

/// Tile multiply-adds done by [`peak_loop`] per iteration: 4 instructions of 16 rows × 16 columns
/// × 32 features.
pub const PEAK_FLOPS_PER_ITERATION: usize = 4 * TILE_ROWS * 16 * TILE_FEATURES * 2;

/// `iterations` rounds of 4 independent tile multiply-adds on tiles that stay in registers: the
/// multiply-add peak that `huginn bench --roofline` measures on CPUs with AMX.
///
/// # Safety
/// [`available`] must have returned true.
#[cfg(target_arch = "x86_64")]
pub unsafe fn peak_loop(iterations: usize) {
    use std::arch::asm;
    #[repr(C, align(64))]
    struct Zeros([u8; TILE_ROWS * 64]);
    let zeros = Zeros([0; TILE_ROWS * 64]);
    let config = TileConfig::new(TILE_ROWS);
    // SAFETY: the caller guarantees AMX is enabled for this process; the tiles load 16 rows of
    // 64 bytes from `zeros`; the tile registers are not used by compiled code.
    unsafe {
        asm!("ldtilecfg [{0}]", in(reg) &config as *const TileConfig, options(nostack, readonly));
        asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
        asm!(
            "tileloadd tmm4, [{z} + {s}*1]",
            "tileloadd tmm5, [{z} + {s}*1]",
            "tileloadd tmm6, [{z} + {s}*1]",
            "tileloadd tmm7, [{z} + {s}*1]",
            z = in(reg) zeros.0.as_ptr(),
            s = in(reg) 64usize,
            options(nostack, readonly),
        );
        for _ in 0..iterations {
            asm!(
                "tdpbf16ps tmm0, tmm4, tmm5",
                "tdpbf16ps tmm1, tmm4, tmm6",
                "tdpbf16ps tmm2, tmm4, tmm7",
                "tdpbf16ps tmm3, tmm5, tmm6",
                options(nostack, nomem),
            );
        }
        asm!("tilerelease", options(nostack, nomem));
    }
}

/// Never called: [`available`] is false off x86-64.
///
/// # Safety
/// None needed; it panics.
#[cfg(not(target_arch = "x86_64"))]
pub unsafe fn peak_loop(_: usize) {
    unreachable!("AMX tiles exist only on x86-64")
}

/// Never called: [`available`] is false off x86-64.
///
/// # Safety
/// None needed; it panics.
#[cfg(not(target_arch = "x86_64"))]
pub unsafe fn column_group(_: *const u16, _: usize, _: usize, _: *const u16, _: usize, _: *mut f32, _: usize) {
    unreachable!("AMX tiles exist only on x86-64")
}
