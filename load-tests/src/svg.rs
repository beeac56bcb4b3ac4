//! Line charts as hand-written SVG: axes with round ticks, one polyline per series, a legend, and optional
//! vertical markers (the end of the offered load). Enough for the load-test reports; no plotting crate.

use std::fmt::Write as _;

/// Colours of the series, in order (colour-blind friendly, after Okabe and Ito).
const PALETTE: [&str; 8] = [
    "#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9", "#000000", "#999999",
];

/// The plot area's width; the legend to its right is as wide as its longest label.
const PLOT_WIDTH: f64 = 650.0;
const HEIGHT: f64 = 360.0;
const LEFT: f64 = 70.0;
const TOP: f64 = 36.0;
const BOTTOM: f64 = 46.0;

/// One line: points `(x, y)`; points with a non-finite coordinate break the line.
#[derive(Debug, Clone)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    pub dashed: bool,
}

impl Series {
    pub fn new(label: impl Into<String>, points: Vec<(f64, f64)>) -> Series {
        Series {
            label: label.into(),
            points,
            dashed: false,
        }
    }

    pub fn dashed(mut self) -> Series {
        self.dashed = true;
        self
    }
}

/// A chart of several series over one x axis.
#[derive(Debug, Clone)]
pub struct LineChart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    /// Vertical lines at these x values, with a label.
    pub markers: Vec<(f64, String)>,
    /// The y axis starts at 0 (throughput, memory) rather than at the lowest value.
    pub y_from_zero: bool,
}

impl LineChart {
    pub fn new(title: impl Into<String>, x_label: &str, y_label: &str) -> LineChart {
        LineChart {
            title: title.into(),
            x_label: x_label.to_owned(),
            y_label: y_label.to_owned(),
            series: Vec::new(),
            markers: Vec::new(),
            y_from_zero: true,
        }
    }

    pub fn series(mut self, s: Series) -> LineChart {
        self.series.push(s);
        self
    }

    pub fn marker(mut self, x: f64, label: impl Into<String>) -> LineChart {
        self.markers.push((x, label.into()));
        self
    }

    /// The SVG document.
    pub fn render(&self) -> String {
        let finite = |p: &&(f64, f64)| p.0.is_finite() && p.1.is_finite();
        let all: Vec<(f64, f64)> = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().filter(finite).copied())
            .collect();
        let (mut x0, mut x1) = bounds(all.iter().map(|p| p.0));
        for (x, _) in &self.markers {
            x0 = x0.min(*x);
            x1 = x1.max(*x);
        }
        let (mut y0, y1) = bounds(all.iter().map(|p| p.1));
        if self.y_from_zero {
            y0 = y0.min(0.0);
        }
        let x_ticks = ticks(x0, x1);
        let y_ticks = ticks(y0, y1);
        let (x0, x1) = (x_ticks[0], *x_ticks.last().unwrap_or(&x1));
        let (y0, y1) = (y_ticks[0], *y_ticks.last().unwrap_or(&y1));
        let longest = self
            .series
            .iter()
            .map(|s| s.label.chars().count())
            .max()
            .unwrap_or(0);
        // About 7 px a character at 12 px sans-serif, after the 28 px sample line.
        let right = 50.0 + 7.0 * longest as f64;
        let width = (LEFT + PLOT_WIDTH + right).round();
        let plot_w = PLOT_WIDTH;
        let plot_h = HEIGHT - TOP - BOTTOM;
        let sx = |x: f64| LEFT + (x - x0) / (x1 - x0) * plot_w;
        let sy = |y: f64| TOP + plot_h - (y - y0) / (y1 - y0) * plot_h;

        let mut out = String::new();
        let _ = writeln!(
            out,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{HEIGHT}" viewBox="0 0 {width} {HEIGHT}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(
            out,
            r#"<rect width="{width}" height="{HEIGHT}" fill="white"/>"#
        );
        let _ = writeln!(
            out,
            r#"<text x="{}" y="20" font-size="15" font-weight="bold">{}</text>"#,
            LEFT,
            escape(&self.title)
        );
        for &t in &y_ticks {
            let y = sy(t);
            let _ = writeln!(
                out,
                r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e5e5e5"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
                LEFT + plot_w,
                LEFT - 6.0,
                y + 4.0,
                number(t)
            );
        }
        for &t in &x_ticks {
            let x = sx(t);
            let _ = writeln!(
                out,
                r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.1}" stroke="#f0f0f0"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
                TOP + plot_h,
                TOP + plot_h + 16.0,
                number(t)
            );
        }
        let _ = writeln!(
            out,
            r##"<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#444"/>"##
        );
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            LEFT + plot_w / 2.0,
            HEIGHT - 8.0,
            escape(&self.x_label)
        );
        let _ = writeln!(
            out,
            r#"<text transform="translate(16 {:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
            TOP + plot_h / 2.0,
            escape(&self.y_label)
        );
        for (x, label) in &self.markers {
            let x = sx(*x);
            let _ = writeln!(
                out,
                r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.1}" stroke="#888" stroke-dasharray="2 3"/><text x="{:.1}" y="{:.1}" fill="#555">{}</text>"##,
                TOP + plot_h,
                x + 3.0,
                TOP + 12.0,
                escape(label)
            );
        }
        for (i, s) in self.series.iter().enumerate() {
            let colour = PALETTE[i % PALETTE.len()];
            let dash = if s.dashed {
                r#" stroke-dasharray="6 3""#
            } else {
                ""
            };
            for run in s.points.split(|p| !(p.0.is_finite() && p.1.is_finite())) {
                if run.is_empty() {
                    continue;
                }
                let mut points = String::new();
                for &(x, y) in run {
                    let _ = write!(points, "{:.1},{:.1} ", sx(x), sy(y));
                }
                let _ = writeln!(
                    out,
                    r#"<polyline fill="none" stroke="{colour}" stroke-width="1.5"{dash} points="{}"/>"#,
                    points.trim_end()
                );
            }
            let ly = TOP + 8.0 + 18.0 * i as f64;
            let lx = LEFT + plot_w + 12.0;
            let _ = writeln!(
                out,
                r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{colour}" stroke-width="2"{dash}/><text x="{:.1}" y="{:.1}">{}</text>"#,
                lx + 22.0,
                lx + 28.0,
                ly + 4.0,
                escape(&s.label)
            );
        }
        out.push_str("</svg>\n");
        out
    }
}

/// The smallest and largest value, or (0, 1) when there is none.
fn bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) }
}

/// About six round tick values covering `[lo, hi]`, first ≤ lo and last ≥ hi.
pub fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    let (lo, hi) = if hi - lo < 1e-9 {
        (
            lo - 0.5_f64.max(lo.abs() * 0.1),
            hi + 0.5_f64.max(hi.abs() * 0.1),
        )
    } else {
        (lo, hi)
    };
    let raw = (hi - lo) / 6.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * magnitude);
    let first = (lo / step).floor() * step;
    let mut out = Vec::new();
    let mut t = first;
    while t < hi + step * 0.999 {
        out.push(t);
        t = first + step * out.len() as f64;
        if out.len() > 50 {
            break;
        }
    }
    if out.len() < 2 {
        out.push(first + step);
    }
    out
}

/// A tick label: integers without decimals, thousands as `k`, small values with what they need.
fn number(v: f64) -> String {
    let a = v.abs();
    if a >= 10_000.0 && (v / 1000.0).fract().abs() < 1e-9 {
        format!("{}k", v / 1000.0)
    } else if a >= 100.0 || v.fract().abs() < 1e-9 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        assert_eq!(
            ticks(0.0, 300.0),
            vec![0.0, 50.0, 100.0, 150.0, 200.0, 250.0, 300.0]
        );
        let t = ticks(3.2, 7.9);
        assert!(t[0] <= 3.2 && *t.last().unwrap() >= 7.9, "{t:?}");
        let t = ticks(5.0, 5.0);
        assert!(t.len() >= 2 && t[0] <= 5.0 && *t.last().unwrap() >= 5.0);
        let t = ticks(0.0, 2_137.0);
        assert_eq!(t[1] - t[0], 500.0);
    }

    #[test]
    fn renders_one_polyline_per_unbroken_run() {
        let chart = LineChart::new("a <b> & c", "s", "tasks/s")
            .series(Series::new(
                "x",
                vec![(0.0, 1.0), (1.0, 2.0), (2.0, f64::NAN), (3.0, 4.0)],
            ))
            .series(Series::new("y", vec![(0.0, 3.0), (3.0, 1.0)]).dashed())
            .marker(2.5, "end");
        let svg = chart.render();
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 3);
        assert!(svg.contains("a &lt;b&gt; &amp; c"));
        assert!(svg.contains("stroke-dasharray=\"6 3\""));
        assert!(!svg.contains("NaN"));
    }

    #[test]
    fn the_legend_is_as_wide_as_its_longest_label() {
        let width = |label: &str| {
            let svg = LineChart::new("t", "s", "y")
                .series(Series::new(label, vec![(0.0, 1.0)]))
                .render();
            let start = svg.find("width=\"").unwrap() + 7;
            let end = start + svg[start..].find('"').unwrap();
            svg[start..end].parse::<f64>().unwrap()
        };
        assert!(width("in flight (submitted, not completed)") > width("paid") + 150.0);
    }

    #[test]
    fn an_empty_chart_still_renders() {
        let svg = LineChart::new("empty", "s", "MiB").render();
        assert!(svg.contains("</svg>"));
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
    }

    #[test]
    fn labels_are_short() {
        assert_eq!(number(2000.0), "2000");
        assert_eq!(number(20_000.0), "20k");
        assert_eq!(number(2.5), "2.5");
        assert_eq!(number(0.25), "0.25");
        assert_eq!(number(3.0), "3");
    }
}
