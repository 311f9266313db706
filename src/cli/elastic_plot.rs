//! The picture of `huginn bench --elastic`: over the run's time, the p99 time to first token and
//! the p99 inter-token latency of each server (log scale), and elastic depth's factor.

use std::fmt::Write as _;

const W: f64 = 720.0;
const PANEL: f64 = 170.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 56.0;
const GAP: f64 = 45.0;
const COLORS: [&str; 4] = ["#d62728", "#ff7f0e", "#1f77b4", "#9467bd"];

/// One line: a name and its (seconds, value) points.
pub struct Series<'a> {
    pub name: &'a str,
    pub points: Vec<(f64, f64)>,
}

struct Panel {
    top: f64,
    /// Value range (of log10 values on a log panel).
    low: f64,
    high: f64,
    log: bool,
}

impl Panel {
    fn y(&self, v: f64) -> f64 {
        let v = if self.log { v.max(1e-6).log10() } else { v };
        let t = ((v - self.low) / (self.high - self.low)).clamp(0.0, 1.0);
        self.top + PANEL * (1.0 - t)
    }
}

fn axis(svg: &mut String, panel: &Panel, title: &str, end: f64, x: &impl Fn(f64) -> f64) {
    let _ = writeln!(svg, r#"<text x="{LEFT}" y="{}" font-size="13">{title}</text>"#, panel.top - 8.0);
    let ticks: Vec<f64> = if panel.log {
        (panel.low.floor() as i32..=panel.high.ceil() as i32).map(|e| 10f64.powi(e)).collect()
    } else {
        (0..=4).map(|i| panel.low + (panel.high - panel.low) * f64::from(i) / 4.0).collect()
    };
    for v in ticks {
        let y = panel.y(v);
        let label = if panel.log && v < 1.0 {
            format!("{v}")
        } else {
            format!("{v:.2}").trim_end_matches('0').trim_end_matches('.').to_string()
        };
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{label}</text>"##,
            W - RIGHT,
            LEFT - 6.0,
            y + 4.0
        );
    }
    let bottom = panel.top + PANEL;
    let _ = writeln!(svg, r##"<line x1="{LEFT}" x2="{}" y1="{bottom}" y2="{bottom}" stroke="#888"/>"##, x(end));
}

fn line(svg: &mut String, panel: &Panel, points: &[(f64, f64)], color: &str, x: &impl Fn(f64) -> f64) {
    let path: Vec<String> = points.iter().map(|&(t, v)| format!("{:.1},{:.1}", x(t), panel.y(v))).collect();
    if !path.is_empty() {
        let _ =
            writeln!(svg, r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#, path.join(" "));
    }
}

/// Three panels over `phases.len() * phase` seconds: p99 TTFT and p99 ITL per server (ms, log),
/// the depth factor of the elastic ones (colored as in the other panels, by their position in
/// `ttft`); the target latency dashed, each phase's load multiple on top.
pub fn timeline_svg(
    ttft: &[Series],
    itl: &[Series],
    factors: &[Series],
    target_ms: f64,
    phase: f64,
    phases: &[f64],
) -> String {
    let end = phase * phases.len() as f64;
    let x = |t: f64| LEFT + (W - LEFT - RIGHT) * (t / end).clamp(0.0, 1.0);
    let range = |series: &[Series], extra: f64| {
        let values = series.iter().flat_map(|s| s.points.iter().map(|p| p.1)).chain([extra]);
        let (lo, hi) = values.fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
        (lo.max(1e-3).log10().floor(), hi.max(1e-3).log10().ceil().max(lo.max(1e-3).log10().floor() + 1.0))
    };
    let height = TOP + 3.0 * PANEL + 2.0 * GAP + 100.0;
    let title = format!("Open-loop load ramped 0.5x to 3x and back: {} servers", ttft.len());
    let mut svg = super::plot::open_svg(W, height, 11, &title);
    for (p, multiple) in phases.iter().enumerate() {
        let (a, b) = (x(p as f64 * phase), x((p + 1) as f64 * phase));
        if p % 2 == 1 {
            let _ = writeln!(
                svg,
                r##"<rect x="{a:.1}" y="{TOP}" width="{:.1}" height="{:.1}" fill="#f4f4f4"/>"##,
                b - a,
                3.0 * PANEL + 2.0 * GAP
            );
        }
        let _ = writeln!(svg, r#"<text x="{:.1}" y="34" text-anchor="middle">{multiple}x</text>"#, (a + b) / 2.0);
    }
    let (lo, hi) = range(ttft, target_ms);
    let first = Panel { top: TOP + 10.0, low: lo, high: hi, log: true };
    axis(&mut svg, &first, "time to first token, p99 (ms, log)", end, &x);
    for (i, s) in ttft.iter().enumerate() {
        line(&mut svg, &first, &s.points, COLORS[i % COLORS.len()], &x);
    }
    let (lo, hi) = range(itl, target_ms);
    let second = Panel { top: first.top + PANEL + GAP, low: lo, high: hi, log: true };
    axis(&mut svg, &second, "inter-token latency, p99 (ms, log); dashed: the target", end, &x);
    let y = second.y(target_ms);
    let _ = writeln!(
        svg,
        r##"<line x1="{LEFT}" x2="{:.1}" y1="{y:.1}" y2="{y:.1}" stroke="#333" stroke-dasharray="5,4"/>"##,
        x(end)
    );
    for (i, s) in itl.iter().enumerate() {
        line(&mut svg, &second, &s.points, COLORS[i % COLORS.len()], &x);
    }
    let third = Panel { top: second.top + PANEL + GAP, low: 0.0, high: 1.0, log: false };
    axis(&mut svg, &third, "elastic depth: depth factor", end, &x);
    for s in factors {
        let i = ttft.iter().position(|t| t.name == s.name).unwrap_or(0);
        line(&mut svg, &third, &s.points, COLORS[i % COLORS.len()], &x);
    }
    // Seconds at each phase's end.
    for p in 0..=phases.len() {
        let t = p as f64 * phase;
        let _ =
            writeln!(svg, r#"<text x="{:.1}" y="{}" text-anchor="middle">{t}</text>"#, x(t), third.top + PANEL + 14.0);
    }
    for (i, s) in ttft.iter().enumerate() {
        let lx = LEFT + (i % 2) as f64 * 300.0;
        let legend_y = third.top + PANEL + 48.0 + (i / 2) as f64 * 18.0;
        let color = COLORS[i % COLORS.len()];
        let _ = writeln!(
            svg,
            r#"<line x1="{lx}" x2="{}" y1="{legend_y}" y2="{legend_y}" stroke="{color}" stroke-width="3"/><text x="{}" y="{}">{}</text>"#,
            lx + 24.0,
            lx + 30.0,
            legend_y + 4.0,
            s.name
        );
    }
    let _ =
        writeln!(svg, r#"<text x="{}" y="{}" text-anchor="end">seconds</text>"#, W - RIGHT, third.top + PANEL + 30.0);
    svg.push_str("</svg>\n");
    svg
}
