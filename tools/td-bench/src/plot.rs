//! PNG charts for `td-bench thesis`: line charts and grouped bar charts, drawn with plotters.
//!
//! Text needs a TrueType font; DejaVu Sans is looked up where Debian and most distributions
//! install it (`apt-get install fonts-dejavu-core`), or at `$TD_BENCH_FONT`.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Result};
use plotters::prelude::*;
use plotters::style::FontStyle;

const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

static FONT: OnceLock<Result<(), String>> = OnceLock::new();

fn ensure_font() -> Result<()> {
    FONT.get_or_init(|| {
        let env = std::env::var("TD_BENCH_FONT").ok();
        let candidates = env
            .iter()
            .map(String::as_str)
            .chain(FONT_PATHS.iter().copied());
        for p in candidates {
            if let Ok(bytes) = std::fs::read(p) {
                // plotters keeps the font for the life of the process.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                return plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                    .map_err(|_| format!("{p} is not a usable TrueType font"));
            }
        }
        Err(
            "no TrueType font found for the charts: install fonts-dejavu-core, or point \
             $TD_BENCH_FONT at a .ttf file"
                .to_string(),
        )
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

const COLORS: [RGBColor; 5] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
];

fn err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("drawing a chart: {e}")
}

/// A line series: name and points.
pub type Series = (String, Vec<(f64, f64)>);

/// Draws `series` as lines with points; `log_x` puts x on a base-2 log scale.
pub fn line_chart(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[Series],
    log_x: bool,
) -> Result<()> {
    ensure_font()?;
    let pts = series.iter().flat_map(|s| s.1.iter());
    let (mut x0, mut x1, mut y1) = (f64::MAX, f64::MIN, 0f64);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        bail!("nothing to draw for {title}");
    }
    if x0 == x1 {
        x1 = x0 + 1.0;
    }
    let y1 = if y1 <= 0.0 { 1.0 } else { y1 * 1.1 };
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut b = ChartBuilder::on(&root);
    b.caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(72);
    if log_x {
        let mut chart = b
            .build_cartesian_2d((x0..x1).log_scale().base(2.0), 0f64..y1)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc(y_desc)
            .x_label_formatter(&|v| format!("{v:.0}"))
            .draw()
            .map_err(err)?;
        for (i, (name, p)) in series.iter().enumerate() {
            let c = COLORS[i % COLORS.len()];
            chart
                .draw_series(LineSeries::new(p.iter().copied(), c.stroke_width(2)))
                .map_err(err)?
                .label(name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c));
            chart
                .draw_series(p.iter().map(|&xy| Circle::new(xy, 4, c.filled())))
                .map_err(err)?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .draw()
            .map_err(err)?;
    } else {
        let mut chart = b.build_cartesian_2d(x0..x1, 0f64..y1).map_err(err)?;
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc(y_desc)
            .draw()
            .map_err(err)?;
        for (i, (name, p)) in series.iter().enumerate() {
            let c = COLORS[i % COLORS.len()];
            chart
                .draw_series(LineSeries::new(p.iter().copied(), c.stroke_width(2)))
                .map_err(err)?
                .label(name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c));
            chart
                .draw_series(p.iter().map(|&xy| Circle::new(xy, 4, c.filled())))
                .map_err(err)?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .draw()
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

/// Draws grouped bars: one group per category, one bar per series (`values[series][cat]`).
pub fn bar_chart(
    path: &Path,
    title: &str,
    y_desc: &str,
    categories: &[String],
    series: &[(String, Vec<f64>)],
) -> Result<()> {
    ensure_font()?;
    let n = categories.len();
    let k = series.len().max(1);
    if n == 0 {
        bail!("nothing to draw for {title}");
    }
    let ymax = series
        .iter()
        .flat_map(|s| s.1.iter().copied())
        .fold(0f64, f64::max);
    let ymax = if ymax <= 0.0 { 1.0 } else { ymax * 1.15 };
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let cats = categories.to_vec();
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d(0f64..n as f64, 0f64..ymax)
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n * 2 + 1)
        .x_label_formatter(&move |v| {
            let i = v.floor() as usize;
            if (v - v.floor() - 0.5).abs() < 1e-6 && i < cats.len() {
                cats[i].clone()
            } else {
                String::new()
            }
        })
        .y_desc(y_desc)
        .draw()
        .map_err(err)?;
    let w = 0.8 / k as f64;
    for (j, (name, vals)) in series.iter().enumerate() {
        let c = COLORS[j % COLORS.len()];
        chart
            .draw_series(vals.iter().enumerate().map(|(i, &v)| {
                let x = i as f64 + 0.1 + j as f64 * w;
                Rectangle::new([(x, 0.0), (x + w * 0.95, v)], c.filled())
            }))
            .map_err(err)?
            .label(name.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], c.filled()));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_pngs() {
        ensure_font().expect("the chart tests need fonts-dejavu-core");
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.png");
        line_chart(
            &a,
            "t",
            "x",
            "y",
            &[("s".into(), vec![(4.0, 1.0), (8.0, 3.0), (1024.0, 2.0)])],
            true,
        )
        .unwrap();
        let b = dir.path().join("b.png");
        bar_chart(
            &b,
            "t",
            "y",
            &["one".into(), "two".into()],
            &[("s".into(), vec![1.0, 2.0]), ("u".into(), vec![2.0, 0.5])],
        )
        .unwrap();
        for p in [a, b] {
            let bytes = std::fs::read(&p).unwrap();
            assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
            assert!(bytes.len() > 2000);
        }
        assert!(line_chart(&dir.path().join("c.png"), "t", "x", "y", &[], false).is_err());
    }
}
