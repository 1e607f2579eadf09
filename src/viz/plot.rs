//! Line plots as PNG (training and evaluation figures), drawn with the same 8x8 font as the maps.

use super::{Rgb, RgbImage, draw_text, fill};
use crate::error::Result;

/// One line: a name for the legend (none if empty) and (x, y) points.
#[derive(Clone, Debug)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    /// Palette entry; `None`: the series' position in the plot.
    pub color: Option<usize>,
    /// Dashed, without point markers (bands around a line of the same colour).
    pub dashed: bool,
}

impl Series {
    pub fn new(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Self {
            name: name.into(),
            points,
            color: None,
            dashed: false,
        }
    }

    /// The same series in palette colour `color`, dashed or not.
    pub fn styled(self, color: usize, dashed: bool) -> Self {
        Self {
            color: Some(color),
            dashed,
            ..self
        }
    }
}

const PALETTE: [[u8; 3]; 8] = [
    [31, 119, 180],
    [214, 39, 40],
    [44, 160, 44],
    [255, 127, 14],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
];

fn line(img: &mut RgbImage, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: Rgb) {
    dash_line(img, (x0, y0), (x1, y1), c, false)
}

/// A line of 1-pixel steps; `dashed`: 5 drawn, 5 left out.
fn dash_line(img: &mut RgbImage, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: Rgb, dashed: bool) {
    let n = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1);
    for i in 0..=n {
        if dashed && (i / 5) % 2 == 1 {
            continue;
        }
        let t = i as f64 / n as f64;
        let (x, y) = (x0 + (x1 - x0) * t, y0 + (y1 - y0) * t);
        for (dx, dy) in [(0, 0), (1, 0), (0, 1)] {
            img.put_clipped(x as i64 + dx, y as i64 + dy, c);
        }
    }
}

fn tick(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 1e7 || v.abs() < 0.01 {
        format!("{v:.1e}")
    } else if v.abs() >= 100.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

/// Draw the series into a 780x440 PNG at `path` (series without points are left out).
pub fn line_plot(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    path: &std::path::Path,
) -> Result<()> {
    let (w, h) = (780u32, 440u32);
    let (l, r, t, b) = (80f64, 200f64, 40f64, 50f64);
    let mut img = RgbImage::from_pixel(w, h, Rgb([255, 255, 255]));
    let pts: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|p| p.0.is_finite() && p.1.is_finite())
        .collect();
    let black = Rgb([0, 0, 0]);
    draw_text(&mut img, l as i64, 12, title, black);
    if !pts.is_empty() {
        let (mut x0, mut x1, mut y0, mut y1) = pts.iter().fold(
            (f64::MAX, f64::MIN, f64::MAX, f64::MIN),
            |(a, b, c, d), &(x, y)| (a.min(x), b.max(x), c.min(y), d.max(y)),
        );
        if x1 - x0 < 1e-12 {
            (x0, x1) = (x0 - 1.0, x1 + 1.0);
        }
        let pad = ((y1 - y0) * 0.08).max(1e-9 + y1.abs() * 1e-3);
        (y0, y1) = (y0 - pad, y1 + pad);
        let (pw, ph) = (w as f64 - l - r, h as f64 - t - b);
        let sx = |x: f64| l + (x - x0) / (x1 - x0) * pw;
        let sy = |y: f64| t + (1.0 - (y - y0) / (y1 - y0)) * ph;
        let grey = Rgb([220, 220, 220]);
        for i in 0..=4 {
            let fy = y0 + (y1 - y0) * i as f64 / 4.0;
            line(&mut img, (l, sy(fy)), (l + pw, sy(fy)), grey);
            draw_text(&mut img, 4, sy(fy) as i64 - 4, &tick(fy), black);
            let fx = x0 + (x1 - x0) * i as f64 / 4.0;
            draw_text(
                &mut img,
                sx(fx) as i64 - 12,
                (t + ph) as i64 + 8,
                &tick(fx),
                black,
            );
        }
        line(&mut img, (l, t + ph), (l + pw, t + ph), black);
        line(&mut img, (l, t), (l, t + ph), black);
        let mut row = 0;
        for (i, s) in series.iter().enumerate() {
            let mut p: Vec<_> = s
                .points
                .iter()
                .copied()
                .filter(|p| p.0.is_finite() && p.1.is_finite())
                .collect();
            if p.is_empty() {
                continue;
            }
            p.sort_by(|a, b| a.0.total_cmp(&b.0));
            let c = Rgb(PALETTE[s.color.unwrap_or(i) % PALETTE.len()]);
            for win in p.windows(2) {
                dash_line(
                    &mut img,
                    (sx(win[0].0), sy(win[0].1)),
                    (sx(win[1].0), sy(win[1].1)),
                    c,
                    s.dashed,
                );
            }
            if !s.dashed {
                for &(x, y) in &p {
                    fill(&mut img, sx(x) as u32 - 2, sy(y) as u32 - 2, 5, 5, c);
                }
            }
            if s.name.is_empty() {
                continue;
            }
            let ly = t as u32 + 10 + row * 14;
            fill(&mut img, w - r as u32 + 12, ly, 14, 8, c);
            draw_text(
                &mut img,
                (w - r as u32 + 30) as i64,
                ly as i64,
                &s.name,
                black,
            );
            row += 1;
        }
    } else {
        draw_text(&mut img, l as i64, h as i64 / 2, "(no data)", black);
    }
    draw_text(&mut img, l as i64 + 120, h as i64 - 18, x_label, black);
    draw_text(&mut img, 4, 26, y_label, black);
    super::save_png(&img, path)
}
