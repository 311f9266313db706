//! A small SVG line chart of accuracy against num_steps (log2 axis), for the model card.

use std::fmt::Write as _;

use huginn::train::eval::EvalResult;

const W: f64 = 560.0;
const H: f64 = 340.0;
const LEFT: f64 = 60.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 30.0;
const BOTTOM: f64 = 50.0;

pub fn accuracy_svg(points: &[(usize, EvalResult)]) -> String {
    let mut points: Vec<(f64, f64)> =
        points.iter().map(|(n, r)| ((*n.max(&1) as f64).log2(), 100.0 * r.accuracy())).collect();
    points.sort_by(|a, b| a.0.total_cmp(&b.0));
    let max_x = points.iter().map(|p| p.0).fold(1.0, f64::max);
    let x = |v: f64| LEFT + (W - LEFT - RIGHT) * v / max_x;
    let y = |v: f64| TOP + (H - TOP - BOTTOM) * (1.0 - v / 100.0);
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="18" text-anchor="middle" font-size="14">Exact match vs recurrence steps (held-out problems)</text>"#,
        W / 2.0
    );
    for pct in [0.0, 25.0, 50.0, 75.0, 100.0] {
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" x2="{}" y1="{y}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{pct}%</text>"##,
            W - RIGHT,
            LEFT - 6.0,
            y(pct) + 4.0,
            y = y(pct)
        );
    }
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
