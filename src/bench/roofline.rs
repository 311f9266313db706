//! This CPU's limits for `huginn bench --roofline`: the multiply-add peak of each arithmetic path
//! the kernels use (a register-resident loop on every thread: float32 FMA, `vdpbf16ps` where the
//! CPU has AVX512_BF16, AMX tiles where it has AMX), and the time of one linear layer of the CPU
//! kernels.

use std::hint::black_box;
use std::time::Instant;

use candle_core::{Device, Tensor};

use crate::model::{Bf16Kernel, CpuLinear, Result};

/// An arithmetic path of the linear kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Float32 fused multiply-adds (AVX-512, else AVX2).
    F32Fma,
    /// bfloat16 pair dot products into float32 (`vdpbf16ps`).
    Bf16Dot,
    /// AMX tile multiply-adds of bfloat16 into float32 (`tdpbf16ps`).
    AmxTile,
}

impl Path {
    pub fn name(self) -> &'static str {
        match self {
            Path::F32Fma => "float32 FMA",
            Path::Bf16Dot => "bfloat16 vdpbf16ps",
            Path::AmxTile => "bfloat16 AMX tdpbf16ps",
        }
    }
}

/// Floating-point operations per second (a multiply-add is two) of `path` on `threads` threads,
/// best of `repeats`; `None` when this CPU lacks the instructions.
pub fn peak_flops(path: Path, threads: usize, repeats: usize) -> Option<f64> {
    let per_thread = || -> Option<f64> {
        match path {
            Path::F32Fma => fma_loop(),
            Path::Bf16Dot => dot_loop(),
            // 16,384 flops an instruction: fewer rounds for about the same time.
            Path::AmxTile => crate::model::amx_peak_loop(ITERATIONS / 16),
        }
    };
    per_thread()?;
    let mut best: f64 = 0.0;
    for _ in 0..repeats.max(1) {
        let started = Instant::now();
        let flops: f64 = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..threads.max(1)).map(|_| scope.spawn(per_thread)).collect();
            workers.into_iter().filter_map(|w| w.join().ok().flatten()).sum()
        });
        best = best.max(flops / started.elapsed().as_secs_f64());
    }
    Some(best)
}

/// Iterations of the loops: enough for a few tens of milliseconds.
const ITERATIONS: usize = 4_000_000;
/// Independent accumulators, more than the FMA latency times the ports, so the loop is bound by
/// throughput.
const CHAINS: usize = 12;

/// Flops done by one thread's float32 loop.
fn fma_loop() -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F is available.
            unsafe { fma_avx512() };
            return Some((ITERATIONS * CHAINS * 16 * 2) as f64);
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: AVX2 and FMA are available.
            unsafe { fma_avx2() };
            return Some((ITERATIONS * CHAINS * 8 * 2) as f64);
        }
    }
    None
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn fma_avx512() {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_set1_ps(0.5); CHAINS];
    let (a, b) = (_mm512_set1_ps(black_box(0.999_999)), _mm512_set1_ps(black_box(1e-7)));
    for _ in 0..ITERATIONS {
        for sum in acc.iter_mut() {
            *sum = _mm512_fmadd_ps(*sum, a, b);
        }
    }
    black_box(acc);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn fma_avx2() {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_set1_ps(0.5); CHAINS];
    let (a, b) = (_mm256_set1_ps(black_box(0.999_999)), _mm256_set1_ps(black_box(1e-7)));
    for _ in 0..ITERATIONS {
        for sum in acc.iter_mut() {
            *sum = _mm256_fmadd_ps(*sum, a, b);
        }
    }
    black_box(acc);
}

/// Flops done by one thread's `vdpbf16ps` loop (each instruction: 32 multiply-adds).
fn dot_loop() -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bf16") {
        // SAFETY: AVX-512F and AVX512_BF16 are available.
        unsafe { dot_avx512bf16() };
        return Some((ITERATIONS * CHAINS * 32 * 2) as f64);
    }
    None
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
fn dot_avx512bf16() {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_ps(); CHAINS];
    // SAFETY: both are 512 bits; the lanes are reinterpreted as bfloat16 pairs.
    let (a, b) = unsafe {
        (
            std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(black_box(0x3f80_3f80))),
            std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(black_box(0x3380_3380))),
        )
    };
    for _ in 0..ITERATIONS {
        for sum in acc.iter_mut() {
            *sum = _mm512_dpbf16_ps(*sum, a, b);
        }
    }
    black_box(acc);
}

/// A `[n, k]` linear layer of the CPU kernels with random weights, float32 or bfloat16.
pub fn linear(n: usize, k: usize, bf16: bool) -> Result<CpuLinear> {
    CpuLinear::new(&Tensor::rand(-0.05f32, 0.05, (n, k), &Device::Cpu)?, bf16)
}

/// Seconds of one product of `m` rows through `layer` (`k` inputs; a bfloat16 layer through
/// `kernel`, else the best one) after a warm-up: the best of at least `repeats` runs and of as
/// many as fit in [`MIN_TIMED`] (a product of tens of microseconds timed once is mostly noise).
pub fn time_product(layer: &CpuLinear, m: usize, k: usize, repeats: usize, kernel: Option<Bf16Kernel>) -> Result<f64> {
    let values: Vec<f32> = (0..m * k).map(|i| ((i % 97) as f32 - 48.0) / 97.0).collect();
    let xs = Tensor::from_vec(values, (m, k), &Device::Cpu)?;
    let kernel = kernel.unwrap_or_else(Bf16Kernel::best);
    black_box(layer.forward_with(&xs, kernel)?);
    let mut best = f64::INFINITY;
    let timing = Instant::now();
    let mut runs = 0;
    while runs < repeats.max(1) || (timing.elapsed() < MIN_TIMED && runs < 1000) {
        let started = Instant::now();
        black_box(layer.forward_with(&xs, kernel)?);
        best = best.min(started.elapsed().as_secs_f64());
        runs += 1;
    }
    Ok(best)
}

/// How long [`time_product`] keeps timing a short product.
const MIN_TIMED: std::time::Duration = std::time::Duration::from_millis(25);
