//! `huginn bench --roofline`: the linear layers of the CPU kernels against this CPU's limits,
//! measured in the same run. The limits: read bandwidth (every thread) and the multiply-add peak
//! of each arithmetic path (float32 FMA; `vdpbf16ps` where the CPU has AVX512_BF16). The layers:
//! every linear shape of the width-1024 model and of the full-size Huginn-0125 shape (random
//! weights) at 1, 4, 16, 64 and 256 rows, through the float32 kernel and each bfloat16 kernel this
//! CPU has, alternated (the median of the repeats). Each gets GFLOP/s, GB/s and the share of its
//! roofline, min(peak, bandwidth × intensity); a table and `docs/roofline.svg`.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;

use super::bench_tally::median;
use super::report_section::Section;
use huginn::bench::read_bandwidth;
use huginn::bench::roofline::{Path as Arith, linear, peak_flops, time_product};
use huginn::checkpoint::preset;
use huginn::model::{Bf16Kernel, HuginnConfig};

const SECTION: Section = Section { begin: "<!-- roofline: begin -->", end: "<!-- roofline: end -->" };
const ROWS: [usize; 5] = [1, 4, 16, 64, 256];

/// The linear layer shapes of a model: (name, outputs, inputs).
fn shapes(cfg: &HuginnConfig) -> Vec<(&'static str, usize, usize)> {
    let (d, i, v) = (cfg.n_embd, cfg.intermediate_size, cfg.vocab_size);
    let kv = cfg.kv_heads() * cfg.head_dim();
    vec![
        ("attention qkv", d + 2 * kv, d),
        ("attention out", d, d),
        ("mlp gate+up", 2 * i, d),
        ("mlp down", d, i),
        ("adapter", d, 2 * d),
        ("head", v, d),
    ]
}

/// One kernel of the comparison.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    F32,
    Bf16(Bf16Kernel),
}

impl Kind {
    fn name(self) -> String {
        match self {
            Kind::F32 => "float32".into(),
            Kind::Bf16(k) => format!("bf16 {}", k.name()),
        }
    }

    fn weight_bytes(self) -> usize {
        match self {
            Kind::F32 => 4,
            Kind::Bf16(_) => 2,
        }
    }
}

/// One measurement.
struct Point {
    model: &'static str,
    layer: &'static str,
    n: usize,
    k: usize,
    m: usize,
    kind: Kind,
    seconds: f64,
}

impl Point {
    fn flops(&self) -> f64 {
        2.0 * (self.m * self.n * self.k) as f64
    }

    fn bytes(&self) -> f64 {
        (self.n * self.k * self.kind.weight_bytes() + 4 * self.m * (self.n + self.k)) as f64
    }

    fn gflops(&self) -> f64 {
        self.flops() / self.seconds / 1e9
    }
}

struct Limits {
    bandwidth: f64,
    f32_peak: f64,
    bf16_peak: Option<f64>,
    amx_peak: Option<f64>,
}

impl Limits {
    /// The multiply-add peak of `kind`'s arithmetic.
    fn peak(&self, kind: Kind) -> f64 {
        match kind {
            Kind::F32 => self.f32_peak,
            // The portable kernel widens to float32 and multiplies there.
            Kind::Bf16(Bf16Kernel::Portable) => self.f32_peak,
            Kind::Bf16(Bf16Kernel::Amx) => self.amx_peak.or(self.bf16_peak).unwrap_or(self.f32_peak),
            Kind::Bf16(_) => self.bf16_peak.unwrap_or(self.f32_peak),
        }
    }

    /// GFLOP/s the roofline allows `point`: its path's peak, or bandwidth × intensity.
    fn roof(&self, point: &Point) -> f64 {
        self.peak(point.kind).min(self.bandwidth * point.flops() / point.bytes()) / 1e9
    }
}

fn measure(
    model: &'static str,
    cfg: &HuginnConfig,
    kinds: &[Kind],
    repeats: usize,
    rows: &[usize],
) -> anyhow::Result<Vec<Point>> {
    let mut points = Vec::new();
    for (layer, n, k) in shapes(cfg) {
        eprintln!("roofline: {model} {layer} [{n}, {k}]");
        let f32_layer = linear(n, k, false)?;
        let bf16_layer = linear(n, k, true)?;
        for &m in rows {
            let mut times: Vec<Vec<f64>> = vec![Vec::new(); kinds.len()];
            for _ in 0..repeats {
                for (kind, times) in kinds.iter().zip(&mut times) {
                    let seconds = match kind {
                        Kind::F32 => time_product(&f32_layer, m, k, 1, None)?,
                        Kind::Bf16(kernel) => time_product(&bf16_layer, m, k, 1, Some(*kernel))?,
                    };
                    times.push(seconds);
                }
            }
            for (kind, times) in kinds.iter().zip(times) {
                points.push(Point { model, layer, n, k, m, kind: *kind, seconds: median(times) });
            }
        }
    }
    Ok(points)
}

pub fn run(out: &Path, svg_out: &Path, quick: bool) -> anyhow::Result<()> {
    let threads = huginn::cpu_threads::configured();
    let repeats = if quick { 1 } else { 3 };
    let limits = Limits {
        bandwidth: read_bandwidth(1 << 30, threads, 3),
        f32_peak: peak_flops(Arith::F32Fma, threads, 3).context("this CPU has no AVX2/AVX-512 FMA")?,
        bf16_peak: peak_flops(Arith::Bf16Dot, threads, 3),
        amx_peak: peak_flops(Arith::AmxTile, threads, 3),
    };
    let mut kinds = vec![Kind::F32];
    kinds.extend(Bf16Kernel::available().into_iter().rev().map(Kind::Bf16));
    let mut points =
        measure("width-1024", &preset("width-1024")?, &kinds, repeats, if quick { &[1, 4, 16] } else { &ROWS })?;
    if !quick {
        points.extend(measure("Huginn-0125", &preset("huginn-0125")?, &kinds, repeats, &ROWS)?);
    }
    let svg = super::roofline_plot::roofline_svg(
        &points.iter().map(|p| (p.kind.name(), p.flops() / p.bytes(), p.gflops())).collect::<Vec<_>>(),
        limits.bandwidth / 1e9,
        &[("float32 FMA".to_string(), limits.f32_peak / 1e9)]
            .into_iter()
            .chain(limits.bf16_peak.map(|p| ("vdpbf16ps".to_string(), p / 1e9)))
            .chain(limits.amx_peak.map(|p| ("AMX tdpbf16ps".to_string(), p / 1e9)))
            .collect::<Vec<_>>(),
    );
    if let Some(parent) = svg_out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(svg_out, svg).with_context(|| format!("writing {}", svg_out.display()))?;
    let md = report(&points, &limits, &kinds, threads, repeats, svg_out);
    SECTION.write(out, &md)?;
    println!("{md}");
    Ok(())
}

fn report(points: &[Point], limits: &Limits, kinds: &[Kind], threads: usize, repeats: usize, svg: &Path) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "{}\n## The linear layers against this CPU's roofline\n", SECTION.begin);
    let _ = writeln!(
        md,
        "`huginn bench --roofline`, {threads} threads, medians of {repeats} alternated run(s). Limits measured in \
         this run: read bandwidth {:.1} GB/s; multiply-add peak {:.1} GFLOP/s in float32 FMA{}{}. {}. Each layer: \
         GFLOP/s and, in brackets, the share of its roofline min(peak of its path, bandwidth × flops/bytes), \
         bytes being the weights plus the float32 rows in and out.\n",
        limits.bandwidth / 1e9,
        limits.f32_peak / 1e9,
        limits
            .bf16_peak
            .map_or(String::from(" (no AVX512_BF16)"), |p| format!(", {:.1} GFLOP/s in vdpbf16ps", p / 1e9)),
        limits.amx_peak.map_or(String::new(), |p| format!(", {:.1} GFLOP/s in AMX tdpbf16ps", p / 1e9)),
        huginn::model::bf16_kernel_description(),
    );
    let header: Vec<String> = kinds.iter().map(|k| k.name()).collect();
    let _ = writeln!(md, "| model | layer | [n, k] | rows | {} | best bf16 / float32 |", header.join(" | "));
    let _ = writeln!(md, "|---|---|---|---:|{}---:|", "---:|".repeat(kinds.len()));
    for group in points.chunks(kinds.len()) {
        let first = &group[0];
        let cells: Vec<String> =
            group.iter().map(|p| format!("{:.1} ({:.0}%)", p.gflops(), 100.0 * p.gflops() / limits.roof(p))).collect();
        let best_bf16 = group.iter().filter(|p| p.kind != Kind::F32).map(Point::gflops).fold(0.0, f64::max);
        let _ = writeln!(
            md,
            "| {} | {} | [{}, {}] | {} | {} | {:.2}x |",
            first.model,
            first.layer,
            first.n,
            first.k,
            first.m,
            cells.join(" | "),
            best_bf16 / first.gflops()
        );
    }
    // The goals: bfloat16 at 16 rows and more against float32, and against its own peak.
    let best = *kinds.last().unwrap_or(&Kind::F32);
    let wide: Vec<&[Point]> = points.chunks(kinds.len()).filter(|g| g[0].m >= 16).collect();
    let ratios: Vec<f64> = wide
        .iter()
        .map(|g| {
            let f32 = g[0].gflops();
            g.iter().filter(|p| p.kind == best).map(Point::gflops).next().unwrap_or(0.0) / f32
        })
        .collect();
    let shares: Vec<f64> = wide
        .iter()
        .filter_map(|g| g.iter().find(|p| p.kind == best))
        .map(|p| p.gflops() * 1e9 / limits.peak(best))
        .collect();
    let (lo, hi) = ratios.iter().fold((f64::MAX, 0.0f64), |(lo, hi), &r| (lo.min(r), hi.max(r)));
    let _ = writeln!(
        md,
        "\nAt 16 rows and more, {} runs at {lo:.2}x to {hi:.2}x the float32 kernel's GFLOP/s (median {:.2}x; goal: at \
         least 1.7x) and at {:.0}% of its multiply-add peak (median; goal: at least 70%). ![roofline]({})\n{}",
        best.name(),
        median(ratios.clone()),
        100.0 * median(shares),
        svg.file_name().map_or(String::new(), |n| n.to_string_lossy().into_owned()),
        SECTION.end
    );
    md
}

pub fn kept_section(out: &Path) -> String {
    SECTION.kept(out)
}
