//! A section of the benchmark report that one `huginn bench` flag rewrites on its own, between
//! HTML-comment markers, and that a full run keeps as it is.

use std::path::Path;

use anyhow::Context;

pub struct Section {
    pub begin: &'static str,
    pub end: &'static str,
}

impl Section {
    /// Replaces this section of the report at `out` with `md` (which holds the markers), or
    /// appends it when the report has none.
    pub fn write(&self, out: &Path, md: &str) -> anyhow::Result<()> {
        let report = std::fs::read_to_string(out).unwrap_or_default();
        let report = match (report.find(self.begin), report.find(self.end)) {
            (Some(a), Some(b)) if b > a => {
                format!("{}{}{}", &report[..a], md.trim_end(), &report[b + self.end.len()..])
            }
            _ => format!("{}\n\n{md}", report.trim_end()),
        };
        std::fs::write(out, report).with_context(|| format!("writing {}", out.display()))
    }

    /// This section of the report at `out`, if it has one.
    pub fn kept(&self, out: &Path) -> String {
        let report = std::fs::read_to_string(out).unwrap_or_default();
        match (report.find(self.begin), report.find(self.end)) {
            (Some(a), Some(b)) if b > a => format!("\n{}\n", &report[a..b + self.end.len()]),
            _ => String::new(),
        }
    }
}
