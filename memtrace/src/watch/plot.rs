//! `--plot FILE.svg`: the sampled series drawn as lines, one panel per kind of memory, each
//! with its own scale; flagged series drawn thick, in the colours listed in the legend.
use std::fmt::Write as _;

use crate::units::human_bytes;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Panel {
    Processes,
    AddressSpace,
    Slab,
}

impl Panel {
    fn title(self) -> &'static str {
        match self {
            Self::Processes => "process private memory (USS)",
            Self::AddressSpace => "process address space (VSS)",
            Self::Slab => "slab caches",
        }
    }
}

/// One series to draw: `(seconds, bytes)` points.
#[derive(Clone, Debug)]
pub struct Line {
    pub panel: Panel,
    pub label: String,
    pub points: Vec<(f64, u64)>,
    /// Flagged as growing at some point of the watch.
    pub flagged: bool,
}

const COLOURS: [&str; 8] = [
    "#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];
const WIDTH: f64 = 900.0;
const PANEL_HEIGHT: f64 = 220.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 260.0;
const TOP: f64 = 30.0;
const GAP: f64 = 50.0;

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The SVG document; `title` heads it.
pub fn svg(title: &str, lines: &[Line]) -> String {
    let mut panels: Vec<Panel> = lines.iter().map(|l| l.panel).collect();
    panels.sort();
    panels.dedup();
    let height = TOP + panels.len().max(1) as f64 * (PANEL_HEIGHT + GAP) + 10.0;
    let t_max = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.0))
        .fold(1.0f64, f64::max);
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        out,
        r#"<text x="{LEFT}" y="18" font-size="14" font-weight="bold">{}</text>"#,
        escape(title)
    );
    if panels.is_empty() {
        let _ = writeln!(
            out,
            r#"<text x="{LEFT}" y="{}">nothing was sampled</text>"#,
            TOP + 40.0
        );
    }
    let plot_w = WIDTH - LEFT - RIGHT;
    for (i, panel) in panels.iter().enumerate() {
        let y0 = TOP + i as f64 * (PANEL_HEIGHT + GAP) + 20.0;
        let in_panel: Vec<&Line> = lines.iter().filter(|l| l.panel == *panel).collect();
        let v_max = in_panel
            .iter()
            .flat_map(|l| l.points.iter().map(|p| p.1))
            .max()
            .unwrap_or(1)
            .max(1) as f64;
        let x = |t: f64| LEFT + t / t_max * plot_w;
        let y = |v: u64| y0 + PANEL_HEIGHT - v as f64 / v_max * PANEL_HEIGHT;
        let _ = writeln!(
            out,
            r#"<text x="{LEFT}" y="{}" font-weight="bold">{}</text>"#,
            y0 - 6.0,
            panel.title()
        );
        let _ = writeln!(
            out,
            r##"<rect x="{LEFT}" y="{y0}" width="{plot_w}" height="{PANEL_HEIGHT}" fill="none" stroke="#999"/>"##
        );
        // Four gridlines with their values, and the time axis.
        for k in 0..=4 {
            let v = (v_max * k as f64 / 4.0) as u64;
            let yy = y(v);
            let _ = writeln!(
                out,
                r##"<line x1="{LEFT}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#eee"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
                LEFT + plot_w,
                LEFT - 6.0,
                yy + 4.0,
                human_bytes(v)
            );
            let tt = t_max * k as f64 / 4.0;
            let _ = writeln!(
                out,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{tt:.0}s</text>"#,
                x(tt),
                y0 + PANEL_HEIGHT + 16.0
            );
        }
        for (j, line) in in_panel.iter().enumerate() {
            let colour = COLOURS[j % COLOURS.len()];
            let width = if line.flagged { 3.0 } else { 1.2 };
            let mut pts = String::new();
            for &(t, v) in &line.points {
                let _ = write!(pts, "{:.1},{:.1} ", x(t), y(v));
            }
            let _ = writeln!(
                out,
                r#"<polyline fill="none" stroke="{colour}" stroke-width="{width}" points="{}"/>"#,
                pts.trim_end()
            );
            let ly = y0 + 12.0 + j as f64 * 16.0;
            if ly < y0 + PANEL_HEIGHT {
                let mark = if line.flagged { " (flagged)" } else { "" };
                let _ = writeln!(
                    out,
                    r#"<rect x="{:.1}" y="{:.1}" width="12" height="4" fill="{colour}"/><text x="{:.1}" y="{:.1}">{}{mark}</text>"#,
                    LEFT + plot_w + 10.0,
                    ly - 4.0,
                    LEFT + plot_w + 26.0,
                    ly,
                    escape(&line.label)
                );
            }
        }
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_a_panel_per_kind_with_escaped_labels() {
        let lines = vec![
            Line {
                panel: Panel::Processes,
                label: "42 a<b> uss".into(),
                points: vec![(0.0, 1 << 20), (10.0, 11 << 20)],
                flagged: true,
            },
            Line {
                panel: Panel::Slab,
                label: "dentry".into(),
                points: vec![(0.0, 5 << 20), (10.0, 5 << 20)],
                flagged: false,
            },
        ];
        let doc = svg("memtrace watch", &lines);
        assert!(doc.starts_with("<svg") && doc.ends_with("</svg>\n"));
        assert_eq!(doc.matches("<polyline").count(), 2);
        assert!(doc.contains("42 a&lt;b&gt; uss (flagged)"));
        assert!(doc.contains("slab caches") && doc.contains("(USS)"));
        assert!(!doc.contains("(VSS)"));
        assert!(svg("empty", &[]).contains("nothing was sampled"));
    }
}
