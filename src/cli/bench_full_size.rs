//! `huginn bench --full-size`: the published Huginn-0125 shape in bfloat16 (random weights, 4
//! shards, about 7 GB, written once), loaded with the default settings as `huginn serve --model`
//! would: load time against reading the files once, peak resident memory against the weights'
//! bytes, and batch-1 core steps/s against the memory-bandwidth bound. The section replaces the
//! one between its markers in the report (the rest of the report is kept).

use std::fmt::Write as _;
use std::io::Read;
use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device};

use super::bench_tally::median;
use super::report_section::Section;
use huginn::bench::{
    core_step_weight_bytes, decode_speed, per_token_weight_bytes, read_pattern_tokens_per_second, serving_weight_bytes,
};
use huginn::checkpoint::{preset, write_random_checkpoint};
use huginn::model::{BackendChoice, HuginnModel, dtype_name};

const SECTION: Section = Section { begin: "<!-- full-size: begin -->", end: "<!-- full-size: end -->" };

/// Loads measured, each after a read of the files.
const LOADS: usize = 5;
/// Batch-1 decodes, each followed by its bound.
const DECODE_PAIRS: usize = 5;

/// Measures the full-size model in `dir` and writes its section into `out`.
pub fn run(dir: &Path, out: &Path) -> anyhow::Result<()> {
    ensure_checkpoint(dir)?;
    let files = weight_files(dir)?;
    let file_bytes: u64 = files.iter().map(|f| f.metadata().map(|m| m.len()).unwrap_or(0)).sum();
    // Reading the files once (into a small buffer), then loading, alternately, LOADS times (the
    // previous model dropped first): every pair is listed, the median ratio is the figure.
    let mut reads = Vec::new();
    let mut fills = Vec::new();
    let mut loads = Vec::new();
    let mut model = None;
    for _ in 0..LOADS {
        drop(model.take());
        fills.push(read_into_memory(&files)?);
        reads.push(read_once(&files)?);
        reset_peak_rss();
        let before = rss_kb("VmRSS:");
        let started = Instant::now();
        let loaded = HuginnModel::load_with(dir, &Device::Cpu, None, BackendChoice::Auto)
            .with_context(|| format!("loading {}", dir.display()))?;
        let seconds = started.elapsed().as_secs_f64();
        let peak = rss_kb("VmHWM:").saturating_sub(before) * 1024;
        eprintln!("full-size load: {seconds:.1} s, peak {:.2} GB above the start", peak as f64 / 1e9);
        loads.push((seconds, peak));
        model = Some(loaded);
    }
    let weights = serving_weight_bytes(model.as_ref().context("no model loaded")?);
    // What no load can avoid beyond the read: the kernel handing out (zeroing) fresh pages for
    // the weights. Measured with the model dropped, as the second and third loads see the machine.
    drop(model.take());
    let touch = first_touch_seconds(weights);
    let model = HuginnModel::load_with(dir, &Device::Cpu, None, BackendChoice::Auto)?;
    let threads = huginn::cpu_threads::configured();
    let steps = 4;
    let tokenizer = std::sync::Arc::new(huginn::text::TextTokenizer::load(dir, model.config())?);
    let model = std::sync::Arc::new(model);
    let (token_bytes, step_bytes) = (per_token_weight_bytes(&model), core_step_weight_bytes(&model));
    // Decode and its bound, alternated (the machine's bandwidth moves by 1.5x within minutes):
    // the bound of a token is its weights read once (prelude, coda, head) and the core block's
    // once per step, summed on as many threads as the model uses.
    let mut pairs = Vec::new();
    for _ in 0..DECODE_PAIRS {
        let tokens_per_second = decode_speed(&model, &tokenizer, &[84, 104, 101, 32], steps, 2, 1)?.tokens_per_second();
        let bound = read_pattern_tokens_per_second(token_bytes, step_bytes, steps, threads, 1);
        eprintln!("full-size: {tokens_per_second:.3} tokens/s, bound {bound:.3}");
        pairs.push((tokens_per_second, bound));
    }
    let shares: Vec<f64> = pairs.iter().map(|(speed, bound)| speed / bound).collect();
    let (speed, bound) = (median(pairs.iter().map(|p| p.0).collect()), median(pairs.iter().map(|p| p.1).collect()));

    let mut md = String::new();
    writeln!(md, "{}", SECTION.begin)?;
    writeln!(md, "## Loading the full-size Huginn-0125 shape\n")?;
    writeln!(md, "Produced by `cargo run --release -- bench --full-size` (only this section is rewritten).")?;
    writeln!(
        md,
        "The published shape (`huginn init-random --preset huginn-0125 --dtype bf16 --shards 4`, random weights),"
    )?;
    writeln!(
        md,
        "loaded as `huginn serve --model` does with the default settings (`model.dtype = auto`: {}, {} kernels).",
        dtype_name(model.dtype()),
        model.backend().name()
    )?;
    writeln!(
        md,
        "{LOADS} rounds (the files in the page cache, the previous model dropped), each: the files read once into \
         fresh memory (every file into a new buffer, kept until all are read, on every thread: what any loader \
         holding the bytes in process memory pays), the files read once through a small buffer (as `cat` does), \
         then the load.\n"
    )?;
    writeln!(
        md,
        "| run | read into memory (s) | read through a buffer (s) | load (s) | load / read into memory | load / read through a buffer | peak RSS during load (GB) | peak / weights |"
    )?;
    writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    for (i, ((fill, read), (load, peak))) in fills.iter().zip(&reads).zip(&loads).enumerate() {
        writeln!(
            md,
            "| {} | {fill:.1} | {read:.1} | {load:.1} | {:.2}x | {:.2}x | {:.2} | {:.2}x |",
            i + 1,
            load / fill,
            load / read,
            *peak as f64 / 1e9,
            *peak as f64 / weights as f64
        )?;
    }
    let median_ratio = |baseline: &[f64]| {
        let mut ratios: Vec<f64> = baseline.iter().zip(&loads).map(|(base, (load, _))| load / base).collect();
        ratios.sort_by(f64::total_cmp);
        ratios[ratios.len() / 2]
    };
    let peak_ratio = loads.iter().map(|(_, peak)| *peak as f64 / weights as f64).fold(0.0, f64::max);
    writeln!(
        md,
        "\n- load / read, median of the {LOADS} rounds: {:.2}x the read into memory, {:.2}x the read through a buffer \
         (target: at most 2x); peak RSS at most {peak_ratio:.2}x the weights (target: at most 1.3x)",
        median_ratio(&fills),
        median_ratio(&reads)
    )?;
    writeln!(
        md,
        "- writing {:.2} GB of fresh memory once (one byte per page, on every thread: the pages the kernel \
         zeroes for the weights) took {touch:.1} s, after a model was dropped; a load is at least that plus the read",
        weights as f64 / 1e9
    )?;
    writeln!(
        md,
        "- checkpoint files: {:.2} GB; weights in memory after loading: {:.2} GB",
        file_bytes as f64 / 1e9,
        weights as f64 / 1e9
    )?;
    writeln!(
        md,
        "  (the tied embedding table is held once, packed as the output head; embedding lookups read its rows)"
    )?;
    writeln!(
        md,
        "- batch 1, num_steps {steps}: {speed:.3} tokens/s (median of {DECODE_PAIRS}). A token reads {:.2} GB of \
         weights once (prelude, coda, head) and the core block's {:.2} GB once per step; reading that pattern \
         (summing the bytes on {threads} threads, alternated with the decode) bounds it at {bound:.3} tokens/s \
         (median). Decode / bound, pair by pair: {}; median {:.0}% of the bound (goal: at least 80%)",
        token_bytes as f64 / 1e9,
        step_bytes as f64 / 1e9,
        shares.iter().map(|s| format!("{:.0}%", 100.0 * s)).collect::<Vec<_>>().join(", "),
        100.0 * median(shares.clone())
    )?;
    writeln!(md, "{}", SECTION.end)?;
    SECTION.write(out, &md)?;
    eprintln!("wrote the full-size section of {}", out.display());
    Ok(())
}

/// The full-size section of the report at `out`, if it has one (a full run keeps it).
pub fn kept_section(out: &Path) -> String {
    SECTION.kept(out)
}

pub(super) fn ensure_checkpoint(dir: &Path) -> anyhow::Result<()> {
    if dir.join("model.safetensors.index.json").is_file() {
        return Ok(());
    }
    eprintln!("writing the full-size random checkpoint to {} (about 7 GB)", dir.display());
    write_random_checkpoint(dir, &preset("huginn-0125")?, 125, DType::BF16, 4)?;
    Ok(())
}

pub(super) fn weight_files(dir: &Path) -> anyhow::Result<Vec<std::fs::File>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            files.push(std::fs::File::open(&path)?);
        }
    }
    Ok(files)
}

/// Seconds to read every file once, front to back, into an 8 MiB buffer.
pub(super) fn read_once(files: &[std::fs::File]) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut buffer = vec![0u8; 8 << 20];
    for file in files {
        let mut file = file.try_clone()?;
        std::io::Seek::rewind(&mut file)?;
        while file.read(&mut buffer)? > 0 {}
    }
    Ok(started.elapsed().as_secs_f64())
}

/// Seconds to read every file once into a new buffer of its own (asking for huge pages, as packed
/// weights do), in parts of 8 MiB on every thread; the buffers are dropped after the last file.
fn read_into_memory(files: &[std::fs::File]) -> anyhow::Result<f64> {
    use rayon::prelude::*;
    let started = Instant::now();
    let mut kept = Vec::with_capacity(files.len());
    for file in files {
        let len = usize::try_from(file.metadata()?.len())?;
        let mut buffer = advised_buffer(len);
        buffer.spare_capacity_mut()[..len]
            .par_chunks_mut(8 << 20)
            .enumerate()
            .try_for_each(|(i, part)| read_uninit_at(file, part, (i * (8 << 20)) as u64))?;
        // SAFETY: the parts cover the first `len` bytes, each written above.
        unsafe { buffer.set_len(len) };
        kept.push(buffer);
    }
    let seconds = started.elapsed().as_secs_f64();
    drop(kept);
    Ok(seconds)
}

/// Fills `part` with the bytes of `file` at `offset` (positioned reads straight into the
/// uninitialized memory: no pass of its own writes it first).
fn read_uninit_at(file: &std::fs::File, part: &mut [std::mem::MaybeUninit<u8>], offset: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut done = 0;
    while done < part.len() {
        let at = libc::off_t::try_from(offset + done as u64).map_err(std::io::Error::other)?;
        // SAFETY: the pointer and length stay inside `part`; the kernel only writes to it.
        let read = unsafe { libc::pread(file.as_raw_fd(), part[done..].as_mut_ptr().cast(), part.len() - done, at) };
        match read {
            n if n > 0 => done += n as usize,
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            _ => {
                let error = std::io::Error::last_os_error();
                if error.kind() != std::io::ErrorKind::Interrupted {
                    return Err(error);
                }
            }
        }
    }
    Ok(())
}

/// An empty buffer with room for `bytes`, its pages advised to be huge (as packed weights are).
fn advised_buffer(bytes: usize) -> Vec<u8> {
    let buffer: Vec<u8> = Vec::with_capacity(bytes);
    #[cfg(target_os = "linux")]
    {
        let start = (buffer.as_ptr() as usize).next_multiple_of(4096);
        let end = (buffer.as_ptr() as usize + bytes) / 4096 * 4096;
        if end > start {
            // SAFETY: only advice, on whole pages inside the allocation this Vec owns.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
    buffer
}

/// Seconds to allocate `bytes` of fresh memory (asking for huge pages, as packed weights do) and
/// write one byte per 4 KiB on every thread.
fn first_touch_seconds(bytes: usize) -> f64 {
    use rayon::prelude::*;
    let started = Instant::now();
    let mut buffer = advised_buffer(bytes);
    buffer.spare_capacity_mut().par_chunks_mut(2 << 20).for_each(|part| {
        for page in part.chunks_mut(4096) {
            page[0].write(1);
        }
    });
    let seconds = started.elapsed().as_secs_f64();
    drop(buffer);
    seconds
}

/// Resets the peak resident set (`VmHWM`) to the current one (Linux).
pub(super) fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

pub(super) fn rss_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(field)).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0)
}
