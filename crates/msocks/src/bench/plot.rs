//! A small SVG line-plot writer: one or more series of (x, y) points, optional logarithmic
//! x axis, ticks, a legend. Enough for the report's figures without a plotting dependency.

use std::fmt::Write as _;

/// One line of a plot.
pub struct Series {
    /// Legend text.
    pub name: String,
    /// Points, in x order.
    pub points: Vec<(f64, f64)>,
}

/// What the plot shows.
pub struct Plot<'a> {
    /// Title above the plot.
    pub title: &'a str,
    /// X axis label.
    pub x_label: &'a str,
    /// Y axis label.
    pub y_label: &'a str,
    /// Logarithmic (base 2) x axis, for counts such as 1, 8, 64, …
    pub log_x: bool,
    /// The lines.
    pub series: Vec<Series>,
}

const W: f64 = 640.0;
const H: f64 = 400.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 170.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 55.0;
/// Colours that stay distinct for the four peers.
const COLOURS: [&str; 6] = [
    "#555555", "#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e",
];

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A "nice" tick step (1, 2 or 5 times a power of ten) giving about `n` ticks over `span`.
fn nice_step(span: f64, n: f64) -> f64 {
    let raw = (span / n).max(f64::MIN_POSITIVE);
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let m = if f < 1.5 {
        1.0
    } else if f < 3.5 {
        2.0
    } else if f < 7.5 {
        5.0
    } else {
        10.0
    };
    m * mag
}

/// A tick label with as many decimals as the tick step needs (0.5 steps: one decimal).
fn fmt_tick(v: f64, step: f64) -> String {
    let decimals = if step > 0.0 && step < 1.0 {
        (-step.log10()).ceil().max(0.0) as usize
    } else {
        0
    };
    format!("{v:.decimals$}")
}

impl Plot<'_> {
    /// The SVG document.
    pub fn to_svg(&self) -> String {
        let pts = || {
            self.series
                .iter()
                .flat_map(|s| s.points.iter())
                .filter(|p| p.0.is_finite() && p.1.is_finite())
        };
        let tx = |x: f64| if self.log_x { x.max(1e-12).log2() } else { x };
        let (mut x0, mut x1) = (f64::INFINITY, f64::NEG_INFINITY);
        let mut y1 = 0f64;
        for &(x, y) in pts() {
            x0 = x0.min(tx(x));
            x1 = x1.max(tx(x));
            y1 = y1.max(y);
        }
        if !x0.is_finite() {
            (x0, x1) = (0.0, 1.0);
        }
        if x1 <= x0 {
            x1 = x0 + 1.0;
        }
        let ystep = nice_step(if y1 > 0.0 { y1 } else { 1.0 }, 5.0);
        let ytop = ((y1 / ystep).ceil() * ystep).max(ystep);
        let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
        let px = |x: f64| LEFT + (tx(x) - x0) / (x1 - x0) * pw;
        let py = |y: f64| TOP + ph - y / ytop * ph;

        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
        let _ = writeln!(
            s,
            r#"<text x="{}" y="22" text-anchor="middle" font-size="14">{}</text>"#,
            LEFT + pw / 2.0,
            escape(self.title)
        );
        // Axes and grid.
        let mut y = 0.0;
        while y <= ytop + ystep / 2.0 {
            let yy = py(y);
            let _ = writeln!(
                s,
                r##"<line x1="{LEFT}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#e0e0e0"/>"##,
                LEFT + pw
            );
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
                LEFT - 6.0,
                yy + 4.0,
                fmt_tick(y, ystep)
            );
            y += ystep;
        }
        let mut xticks: Vec<f64> = Vec::new();
        for &(x, _) in pts() {
            if !xticks.iter().any(|t| (t - x).abs() < 1e-9) {
                xticks.push(x);
            }
        }
        xticks.sort_by(f64::total_cmp);
        if !self.log_x && xticks.len() > 12 {
            let step = nice_step(x1 - x0, 6.0);
            xticks = (0..=((x1 - x0) / step).floor() as usize)
                .map(|i| x0 + i as f64 * step)
                .collect();
        }
        let xstep = if self.log_x {
            1.0
        } else {
            nice_step(x1 - x0, 6.0)
        };
        for x in xticks {
            let xx = px(x);
            let _ = writeln!(
                s,
                r##"<line x1="{xx:.1}" y1="{TOP}" x2="{xx:.1}" y2="{:.1}" stroke="#f0f0f0"/>"##,
                TOP + ph
            );
            let _ = writeln!(
                s,
                r#"<text x="{xx:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                TOP + ph + 16.0,
                fmt_tick(x, xstep)
            );
        }
        let _ = writeln!(
            s,
            r##"<polyline points="{LEFT},{TOP} {LEFT},{:.1} {:.1},{:.1}" fill="none" stroke="#000"/>"##,
            TOP + ph,
            LEFT + pw,
            TOP + ph
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            LEFT + pw / 2.0,
            H - 12.0,
            escape(self.x_label)
        );
        let _ = writeln!(
            s,
            r#"<text x="16" y="{:.1}" text-anchor="middle" transform="rotate(-90 16 {:.1})">{}</text>"#,
            TOP + ph / 2.0,
            TOP + ph / 2.0,
            escape(self.y_label)
        );
        // Lines and legend.
        for (i, series) in self.series.iter().enumerate() {
            let c = COLOURS[i % COLOURS.len()];
            let line: Vec<String> = series
                .points
                .iter()
                .filter(|p| p.0.is_finite() && p.1.is_finite())
                .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
                .collect();
            let _ = writeln!(
                s,
                r#"<polyline points="{}" fill="none" stroke="{c}" stroke-width="2"/>"#,
                line.join(" ")
            );
            for p in &line {
                if let Some((a, b)) = p.split_once(',') {
                    let _ = writeln!(s, r#"<circle cx="{a}" cy="{b}" r="3" fill="{c}"/>"#);
                }
            }
            let ly = TOP + 10.0 + i as f64 * 20.0;
            let lx = W - RIGHT + 15.0;
            let _ = writeln!(
                s,
                r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{c}" stroke-width="2"/>"#,
                lx + 20.0
            );
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}">{}</text>"#,
                lx + 26.0,
                ly + 4.0,
                escape(&series.name)
            );
        }
        s.push_str("</svg>\n");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn svg_is_well_formed_and_scales() {
        let p = Plot {
            title: "t <&>",
            x_label: "connections",
            y_label: "GB/s",
            log_x: true,
            series: vec![
                Series {
                    name: "a".into(),
                    points: vec![(1.0, 0.5), (8.0, 1.5), (1024.0, 2.0)],
                },
                Series {
                    name: "b".into(),
                    points: vec![(1.0, f64::NAN), (8.0, 0.1)],
                },
            ],
        };
        let svg = p.to_svg();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("t &lt;&amp;&gt;"));
        assert_eq!(svg.matches("<polyline").count(), 3);
        // Every element opened is closed: self-closing tags and text pairs balance.
        assert_eq!(svg.matches("<text").count(), svg.matches("</text>").count());
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
    }
}
