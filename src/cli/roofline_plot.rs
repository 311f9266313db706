//! The picture of `huginn bench --roofline`: GFLOP/s against arithmetic intensity (log-log), the
//! bandwidth slope and each path's peak, one point per measured layer and row count.

use std::fmt::Write as _;

const W: f64 = 640.0;
const H: f64 = 420.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 70.0;
const COLORS: [&str; 4] = ["#d62728", "#7f7f7f", "#1f77b4", "#2ca02c"];

/// `points`: (kernel name, flop/byte, GFLOP/s); `bandwidth` GB/s; `peaks`: (path, GFLOP/s).
pub fn roofline_svg(points: &[(String, f64, f64)], bandwidth: f64, peaks: &[(String, f64)]) -> String {
    let xs = points.iter().map(|p| p.1).chain([0.25]);
    let (x_lo, x_hi) = xs.fold((f64::MAX, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (x_lo, x_hi) = (x_lo.log10().floor(), x_hi.log10().ceil().max(x_lo.log10().floor() + 1.0));
    let top = peaks.iter().map(|p| p.1).fold(0.0f64, f64::max);
    let ys = points.iter().map(|p| p.2).chain([top, bandwidth * 10f64.powf(x_lo)]);
    let (y_lo, y_hi) = ys.fold((f64::MAX, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (y_lo, y_hi) = (y_lo.max(1e-3).log10().floor(), y_hi.log10().ceil());
    let x = |v: f64| LEFT + (W - LEFT - RIGHT) * (v.log10() - x_lo) / (x_hi - x_lo);
    let y = |v: f64| TOP + (H - TOP - BOTTOM) * (1.0 - (v.max(1e-9).log10() - y_lo) / (y_hi - y_lo));
    let mut svg = super::plot::open_svg(W, H, 11, "Linear layers against this CPU's roofline");
    for e in y_lo as i32..=y_hi as i32 {
        let v = 10f64.powi(e);
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" x2="{}" y1="{:.1}" y2="{:.1}" stroke="#eee"/><text x="{}" y="{:.1}" text-anchor="end">{v}</text>"##,
            W - RIGHT,
            y(v),
            y(v),
            LEFT - 6.0,
            y(v) + 4.0
        );
    }
    for e in x_lo as i32..=x_hi as i32 {
        let v = 10f64.powi(e);
        let _ = writeln!(
            svg,
            r##"<line x1="{:.1}" x2="{:.1}" y1="{TOP}" y2="{}" stroke="#eee"/><text x="{:.1}" y="{}" text-anchor="middle">{v}</text>"##,
            x(v),
            x(v),
            H - BOTTOM,
            x(v),
            H - BOTTOM + 16.0
        );
    }
    let _ =
        writeln!(svg, r#"<text x="{}" y="{}" text-anchor="middle">flop per byte</text>"#, W / 2.0, H - BOTTOM + 34.0);
    let _ = writeln!(
        svg,
        r#"<text x="14" y="{}" transform="rotate(-90 14 {})" text-anchor="middle">GFLOP/s</text>"#,
        H / 2.0,
        H / 2.0
    );
    // The roofs: bandwidth × intensity up to each peak.
    let x_max = 10f64.powf(x_hi);
    for (i, (name, peak)) in peaks.iter().enumerate() {
        let knee = peak / bandwidth;
        let start = 10f64.powf(x_lo);
        let _ = writeln!(
            svg,
            r##"<polyline points="{:.1},{:.1} {:.1},{:.1} {:.1},{:.1}" fill="none" stroke="#333" stroke-width="1.5" stroke-dasharray="{}"/>"##,
            x(start),
            y(bandwidth * start),
            x(knee),
            y(*peak),
            x(x_max),
            y(*peak),
            if i == 0 { "none" } else { "6,3" }
        );
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{name} peak {peak:.0}</text>"#,
            x(x_max) - 4.0,
            y(*peak) - 5.0
        );
    }
    let mut names: Vec<&str> = Vec::new();
    for (name, _, _) in points {
        if !names.contains(&name.as_str()) {
            names.push(name);
        }
    }
    for (name, intensity, gflops) in points {
        let i = names.iter().position(|n| n == name).unwrap_or(0);
        let _ = writeln!(
            svg,
            r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{}" fill-opacity="0.75"/>"#,
            x(*intensity),
            y(*gflops),
            COLORS[i % COLORS.len()]
        );
    }
    for (i, name) in names.iter().enumerate() {
        let lx = LEFT + i as f64 * 170.0;
        let ly = H - 14.0;
        let _ = writeln!(
            svg,
            r#"<circle cx="{lx}" cy="{}" r="4" fill="{}"/><text x="{}" y="{ly}">{name}</text>"#,
            ly - 4.0,
            COLORS[i % COLORS.len()],
            lx + 8.0
        );
    }
    svg.push_str("</svg>\n");
    svg
}
