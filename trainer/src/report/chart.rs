//! Line charts as inline SVG: steps on x, one polyline per series, the range of y on the
//! axis. No script and no font file, so the page renders the same offline everywhere.

use std::fmt::Write;

use super::html::escape;

/// One series: its name and its `(step, value)` points, in step order.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

const W: f64 = 560.0;
const H: f64 = 220.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 12.0;
const TOP: f64 = 28.0;
const BOTTOM: f64 = 30.0;
/// Colour-blind-safe (Okabe–Ito).
const COLOURS: [&str; 6] = [
    "#0072b2", "#e69f00", "#009e73", "#d55e00", "#cc79a7", "#56b4e9",
];

/// A short number for an axis label.
fn label(v: f64) -> String {
    let a = v.abs();
    if v == 0.0 {
        "0".into()
    } else if !(1e-3..1e5).contains(&a) {
        format!("{v:.2e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

/// An SVG chart titled `title` of `series` (finite points only); `None` when nothing is
/// left to draw.
pub fn line_chart(title: &str, series: &[Series]) -> Option<String> {
    let finite: Vec<(&Series, Vec<(f64, f64)>)> = series
        .iter()
        .map(|s| {
            let p = s
                .points
                .iter()
                .copied()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .collect::<Vec<_>>();
            (s, p)
        })
        .filter(|(_, p)| !p.is_empty())
        .collect();
    if finite.is_empty() {
        return None;
    }
    let all = finite.iter().flat_map(|(_, p)| p.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in all {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    // One step alone sits in the middle, and only its own step is labelled.
    let single = x1 <= x0;
    if single {
        (x0, x1) = (x0 - 0.5, x1 + 0.5);
    }
    if y1 <= y0 {
        let pad = y0.abs().max(1.0) * 0.05;
        (y0, y1) = (y0 - pad, y1 + pad);
    }
    let sx = |x: f64| LEFT + (x - x0) / (x1 - x0) * (W - LEFT - RIGHT);
    let sy = |y: f64| TOP + (1.0 - (y - y0) / (y1 - y0)) * (H - TOP - BOTTOM);
    let mut svg = String::new();
    let _ = write!(
        svg,
        r##"<svg class="chart" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" aria-label="{t}"><title>{t}</title><rect x="0" y="0" width="{W}" height="{H}" fill="#fff"/><text x="{LEFT}" y="16" class="title">{t}</text>"##,
        t = escape(title)
    );
    let _ = write!(
        svg,
        r##"<line x1="{LEFT}" y1="{b}" x2="{r}" y2="{b}" stroke="#888"/><line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{b}" stroke="#888"/>"##,
        b = H - BOTTOM,
        r = W - RIGHT
    );
    for (y, anchor) in [(y1, TOP + 4.0), (y0, H - BOTTOM)] {
        let _ = write!(
            svg,
            r##"<text x="{x}" y="{anchor}" text-anchor="end" class="tick">{l}</text>"##,
            x = LEFT - 4.0,
            l = label(y)
        );
    }
    let ticks = if single {
        vec![((x0 + x1) / 2.0, "middle")]
    } else {
        vec![(x0, "start"), (x1, "end")]
    };
    for (x, anchor) in ticks {
        let _ = write!(
            svg,
            r##"<text x="{px}" y="{py}" text-anchor="{anchor}" class="tick">step {l}</text>"##,
            px = sx(x),
            py = H - 10.0,
            l = if x.fract() == 0.0 {
                format!("{x:.0}")
            } else {
                label(x)
            }
        );
    }
    for (k, (s, points)) in finite.iter().enumerate() {
        let colour = COLOURS[k % COLOURS.len()];
        let path: Vec<String> = points
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        if points.len() == 1 {
            let _ = write!(
                svg,
                r##"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{colour}"/>"##,
                sx(points[0].0),
                sy(points[0].1)
            );
        } else {
            let _ = write!(
                svg,
                r##"<polyline fill="none" stroke="{colour}" stroke-width="1.6" points="{}"/>"##,
                path.join(" ")
            );
        }
        let _ = write!(
            svg,
            r##"<text x="{x}" y="16" text-anchor="end" class="legend" fill="{colour}">{n}</text>"##,
            x = W - RIGHT - 150.0 * (finite.len() - 1 - k) as f64,
            n = escape(&s.name)
        );
    }
    svg.push_str("</svg>");
    Some(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_map_onto_the_plot_area_and_non_finite_ones_are_dropped() {
        let s = Series {
            name: "loss <train>".into(),
            points: vec![(1.0, 2.0), (2.0, f64::NAN), (3.0, 1.0)],
        };
        let svg = line_chart("Loss", &[s]).unwrap();
        // x from LEFT to W − RIGHT, y from TOP (max) to H − BOTTOM (min).
        assert!(svg.contains(r#"points="64.0,28.0 548.0,190.0""#), "{svg}");
        assert!(svg.contains("loss &lt;train&gt;"));
        let empty = Series {
            name: "x".into(),
            points: vec![(1.0, f64::INFINITY)],
        };
        assert!(line_chart("Nothing", &[empty]).is_none());
    }

    /// A single step is labelled once, as itself, in the middle: no step after it that
    /// never ran.
    #[test]
    fn a_single_step_labels_only_itself() {
        let s = Series {
            name: "loss".into(),
            points: vec![(1.0, 2.0)],
        };
        let svg = line_chart("Loss", &[s]).unwrap();
        assert_eq!(svg.matches("class=\"tick\">step ").count(), 1, "{svg}");
        assert!(
            svg.contains("text-anchor=\"middle\" class=\"tick\">step 1<"),
            "{svg}"
        );
    }
}
