//! A small SVG line chart of accuracy against num_steps (log2 axis), for the model card.

use std::fmt::Write as _;

use huginn::train::eval::EvalResult;

const W: f64 = 560.0;
const H: f64 = 340.0;
const LEFT: f64 = 60.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 30.0;
const BOTTOM: f64 = 50.0;

/// The chart's opening: the SVG element, a white background, `title`, and a horizontal grid line
/// with its label at each of `grid` (y, label).
fn frame(title: &str, grid: &[(f64, String)]) -> String {
    let mut svg = open_svg(W, H, 12, title);
    for (y, label) in grid {
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" x2="{}" y1="{y}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{label}</text>"##,
            W - RIGHT,
            LEFT - 6.0,
            y + 4.0,
        );
    }
    svg
}

/// An SVG chart's opening, shared by the project's charts: the element (`width` x `height`,
/// sans-serif at `font_size`), a white background and `title` centred on top.
pub fn open_svg(width: f64, height: f64, font_size: u32, title: &str) -> String {
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="{font_size}">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(svg, r#"<text x="{}" y="18" text-anchor="middle" font-size="14">{title}</text>"#, width / 2.0);
    svg
}

pub fn accuracy_svg(points: &[(usize, EvalResult)]) -> String {
    let mut points: Vec<(f64, f64)> =
        points.iter().map(|(n, r)| ((*n.max(&1) as f64).log2(), 100.0 * r.accuracy())).collect();
    points.sort_by(|a, b| a.0.total_cmp(&b.0));
    let max_x = points.iter().map(|p| p.0).fold(1.0, f64::max);
    let x = |v: f64| LEFT + (W - LEFT - RIGHT) * v / max_x;
    let y = |v: f64| TOP + (H - TOP - BOTTOM) * (1.0 - v / 100.0);
    let grid: Vec<(f64, String)> =
        [0.0, 25.0, 50.0, 75.0, 100.0].iter().map(|&pct| (y(pct), format!("{pct}%"))).collect();
    let mut svg = frame("Exact match vs recurrence steps (held-out problems)", &grid);
    for &(px, _) in &points {
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            x(px),
            H - BOTTOM + 18.0,
            px.exp2().round()
        );
    }
    let _ = writeln!(svg, r#"<text x="{}" y="{}" text-anchor="middle">num_steps</text>"#, W / 2.0, H - 10.0);
    let path: Vec<String> = points.iter().map(|&(px, py)| format!("{:.1},{:.1}", x(px), y(py))).collect();
    let _ = writeln!(svg, r##"<polyline points="{}" fill="none" stroke="#1f77b4" stroke-width="2"/>"##, path.join(" "));
    for &(px, py) in &points {
        let _ = writeln!(svg, r##"<circle cx="{:.1}" cy="{:.1}" r="4" fill="#1f77b4"/>"##, x(px), y(py));
    }
    svg.push_str("</svg>\n");
    svg
}

const COLORS: [&str; 6] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"];

/// A line chart of the mean core steps at each answer-digit position (most significant first,
/// then the end token), one line per adaptive-exit setting.
pub fn steps_by_position_svg(settings: &[(String, EvalResult)]) -> String {
    let series: Vec<(&str, Vec<f64>)> = settings
        .iter()
        .map(|(name, r)| {
            let mut means = r.mean_steps_by_position();
            means.push(r.mean_end_token_steps());
            (name.as_str(), means)
        })
        .collect();
    let slots = series.iter().map(|(_, m)| m.len()).max().unwrap_or(1).max(2);
    let top = series.iter().flat_map(|(_, m)| m.iter().copied()).fold(1.0, f64::max).ceil();
    let x = |i: usize| LEFT + (W - LEFT - RIGHT) * i as f64 / (slots - 1) as f64;
    let y = |v: f64| TOP + (H - TOP - BOTTOM) * (1.0 - v / top);
    let grid: Vec<(f64, String)> = (0..=4)
        .map(|tick| {
            let v = top * f64::from(tick) / 4.0;
            (y(v), format!("{v:.1}"))
        })
        .collect();
    let mut svg = frame("Mean recurrence steps per answer digit (adaptive exit)", &grid);
    for i in 0..slots {
        let label = if i + 1 == slots { "end".to_string() } else { (i + 1).to_string() };
        let _ = writeln!(svg, r#"<text x="{}" y="{}" text-anchor="middle">{label}</text>"#, x(i), H - BOTTOM + 18.0);
    }
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">answer digit (most significant first), then the end token</text>"#,
        W / 2.0,
        H - 10.0
    );
    for (s, (name, means)) in series.iter().enumerate() {
        let color = COLORS[s % COLORS.len()];
        // The end token sits in the last slot whatever the number of digits.
        let placed: Vec<(usize, f64)> =
            means.iter().enumerate().map(|(i, &m)| (if i + 1 == means.len() { slots - 1 } else { i }, m)).collect();
        let path: Vec<String> = placed.iter().map(|&(i, m)| format!("{:.1},{:.1}", x(i), y(m))).collect();
        let _ =
            writeln!(svg, r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#, path.join(" "));
        for &(i, m) in &placed {
            let _ = writeln!(svg, r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{color}"/>"#, x(i), y(m));
        }
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" fill="{color}">{name}</text>"#,
            LEFT + 10.0,
            TOP + 16.0 + 16.0 * s as f64
        );
    }
    svg.push_str("</svg>\n");
    svg
}
