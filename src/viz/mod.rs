//! Attention-map PNGs: where full attention goes, which blocks the selector keeps, and how much of
//! the full attention mass each token keeps (its attention sparsity).

use font8x8::UnicodeFonts;

mod plot;
pub use plot::{Series, line_plot};

use crate::error::{Result, invalid};
use crate::problem::SENTINEL;

/// What one map shows (one batch element, one query head).
#[derive(Clone, Debug)]
pub struct MapData<'a> {
    /// Title lines.
    pub title: Vec<String>,
    pub seq_q: usize,
    pub seq_k: usize,
    /// Position of query 0 in key coordinates (seq_k - seq_q).
    pub q_offset: usize,
    pub block: usize,
    pub causal: bool,
    /// Token-level full attention `[seq_q, seq_k]`; `None` draws the block-level map.
    pub probs: Option<&'a [f64]>,
    /// Full-attention mass per key block `[seq_q, nb]`.
    pub block_mass: &'a [f32],
    /// Kept blocks per token `[seq_q, k]`, SENTINEL-padded.
    pub selection: &'a [u32],
    pub k: usize,
    /// Share of the full mass inside the kept blocks `[seq_q]`.
    pub sparsity: &'a [f32],
}

/// An 8-bit sRGB pixel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rgb(pub [u8; 3]);

/// An RGB picture, rows top to bottom: what the maps and plots draw on and [`png_bytes`]
/// encodes. Our own few lines instead of the `image` crate: with only its PNG codec it took 37 s
/// of CPU to build (colour management we do not use) against 5 for the `png` crate alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RgbImage {
    width: u32,
    height: u32,
    data: Vec<u8>,
}

impl RgbImage {
    /// A `width` x `height` picture of one colour.
    pub fn from_pixel(width: u32, height: u32, c: Rgb) -> RgbImage {
        let data = c.0.repeat(width as usize * height as usize);
        RgbImage {
            width,
            height,
            data,
        }
    }

    pub fn width(&self) -> u32 {
        self.width
    }

    pub fn height(&self) -> u32 {
        self.height
    }

    fn at(&self, x: u32, y: u32) -> usize {
        assert!(
            x < self.width && y < self.height,
            "pixel ({x}, {y}) outside {}x{}",
            self.width,
            self.height
        );
        3 * (y as usize * self.width as usize + x as usize)
    }

    /// Panics outside the picture (see `put_clipped`).
    pub fn put_pixel(&mut self, x: u32, y: u32, c: Rgb) {
        let i = self.at(x, y);
        self.data[i..i + 3].copy_from_slice(&c.0);
    }

    /// Drawing that may run off the edge: a pixel outside the picture is left out.
    pub fn put_clipped(&mut self, x: i64, y: i64, c: Rgb) {
        if (0..self.width as i64).contains(&x) && (0..self.height as i64).contains(&y) {
            self.put_pixel(x as u32, y as u32, c);
        }
    }

    /// Panics outside the picture.
    pub fn get_pixel(&self, x: u32, y: u32) -> Rgb {
        let i = self.at(x, y);
        Rgb([self.data[i], self.data[i + 1], self.data[i + 2]])
    }

    /// The pixels, 3 bytes each, row after row.
    pub fn as_raw(&self) -> &[u8] {
        &self.data
    }
}

const BG: Rgb = Rgb([255, 255, 255]);
const INK: Rgb = Rgb([20, 20, 20]);
const HIDDEN: Rgb = Rgb([215, 215, 215]);
const KEPT: Rgb = Rgb([0, 230, 255]);
/// Smallest attention weight the colour scale shows (log10).
const LOG_MIN: f64 = -4.0;

/// Magma-like colour map, v in [0, 1].
pub fn magma(v: f64) -> Rgb {
    const STOPS: [(f64, [f64; 3]); 5] = [
        (0.0, [0.0, 0.0, 4.0]),
        (0.25, [81.0, 18.0, 124.0]),
        (0.5, [183.0, 55.0, 121.0]),
        (0.75, [252.0, 137.0, 97.0]),
        (1.0, [252.0, 253.0, 191.0]),
    ];
    let v = v.clamp(0.0, 1.0);
    let i = STOPS.iter().rposition(|s| s.0 <= v).unwrap_or(0).min(3);
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    let f = (v - a.0) / (b.0 - a.0);
    Rgb(std::array::from_fn(|c| {
        (a.1[c] + f * (b.1[c] - a.1[c])).round() as u8
    }))
}

fn log_scale(p: f64) -> f64 {
    (p.max(1e-30).log10() - LOG_MIN) / -LOG_MIN
}

fn mix(a: Rgb, b: Rgb, t: f64) -> Rgb {
    Rgb(std::array::from_fn(|c| {
        (a.0[c] as f64 * (1.0 - t) + b.0[c] as f64 * t).round() as u8
    }))
}

/// Draw `text` with the 8x8 font, top-left at (x, y).
pub fn draw_text(img: &mut RgbImage, x: i64, y: i64, text: &str, color: Rgb) {
    for (n, ch) in text.chars().enumerate() {
        let glyph = font8x8::BASIC_FONTS.get(ch).unwrap_or([0; 8]);
        for (gy, row) in glyph.iter().enumerate() {
            for gx in 0..8 {
                if row >> gx & 1 == 1 {
                    img.put_clipped(x + n as i64 * 8 + gx, y + gy as i64, color);
                }
            }
        }
    }
}

pub(crate) fn fill(img: &mut RgbImage, x: u32, y: u32, w: u32, h: u32, c: Rgb) {
    for yy in y..(y + h).min(img.height()) {
        for xx in x..(x + w).min(img.width()) {
            img.put_pixel(xx, yy, c);
        }
    }
}

/// Render the map. Rows are query tokens (grouped when there are more than 640), columns are
/// keys (token-level) or key blocks.
pub fn render_map(d: &MapData) -> Result<RgbImage> {
    let nb = d.seq_k.div_ceil(d.block);
    if d.seq_q == 0 || d.seq_k == 0 || d.block == 0 || d.k == 0 {
        invalid!("empty map");
    }
    if d.block_mass.len() != d.seq_q * nb
        || d.selection.len() != d.seq_q * d.k
        || d.sparsity.len() != d.seq_q
        || d.probs.is_some_and(|p| p.len() != d.seq_q * d.seq_k)
    {
        invalid!(
            "map inputs do not match seq_q {}, seq_k {}, block {}",
            d.seq_q,
            d.seq_k,
            d.block
        );
    }
    let token_level = d.probs.is_some();
    let cols = if token_level { d.seq_k } else { nb };
    // Rows: query tokens, grouped (averaged) when there are more than 640.
    let group = d.seq_q.div_ceil(640);
    let rows = d.seq_q.div_ceil(group);
    // Cells are stretched to about 640 px each way (block-level maps have few columns).
    let (sx, sy) = (
        (640 / cols).clamp(1, 32) as u32,
        (640 / rows).clamp(1, 32) as u32,
    );
    let (w, h) = (cols as u32 * sx, rows as u32 * sy);
    let (left, top, bottom, right) = (64u32, 28 + 12 * d.title.len() as u32, 44u32, 160u32);
    let mut img = RgbImage::from_pixel(left + w + right, top + h + bottom, BG);

    // Heat map with the kept blocks tinted.
    for r in 0..rows {
        let tokens = (r * group)..((r + 1) * group).min(d.seq_q);
        let n = tokens.len() as f64;
        for c in 0..cols {
            let blk = if token_level { c / d.block } else { c };
            let (mut val, mut kept, mut seen) = (0.0, 0.0, 0.0);
            for t in tokens.clone() {
                let visible = !d.causal || blk * d.block <= d.q_offset + t;
                let visible = visible && (!token_level || !d.causal || c <= d.q_offset + t);
                if !visible {
                    continue;
                }
                seen += 1.0;
                val += match d.probs {
                    Some(p) => p[t * d.seq_k + c],
                    None => d.block_mass[t * nb + c] as f64,
                };
                let sel = &d.selection[t * d.k..(t + 1) * d.k];
                if sel.iter().any(|&b| b != SENTINEL && b as usize == blk) {
                    kept += 1.0;
                }
            }
            let color = if seen == 0.0 {
                HIDDEN
            } else {
                let base = magma(log_scale(val / n));
                mix(base, KEPT, 0.4 * kept / n)
            };
            fill(
                &mut img,
                left + c as u32 * sx,
                top + r as u32 * sy,
                sx,
                sy,
                color,
            );
        }
        // Kept mass strip.
        let sp: f64 = tokens.map(|t| d.sparsity[t] as f64).sum::<f64>() / n;
        let g = (sp.clamp(0.0, 1.0) * 255.0).round() as u8;
        fill(
            &mut img,
            left + w + 10,
            top + r as u32 * sy,
            16,
            sy,
            Rgb([g, g, g]),
        );
    }
    // Colour bar for the attention weights.
    let cb = left + w + 78;
    for y in 0..h {
        let v = 1.0 - y as f64 / (h.max(2) - 1) as f64;
        fill(&mut img, cb, top + y, 14, 1, magma(v));
    }
    for (i, label) in ["1", "1e-1", "1e-2", "1e-3", "1e-4"].iter().enumerate() {
        let y = top + (h.saturating_sub(8)) * i as u32 / 4;
        draw_text(&mut img, (cb + 18) as i64, y as i64, label, INK);
    }
    draw_text(
        &mut img,
        (left + w + 6) as i64,
        (top - 12) as i64,
        "kept",
        INK,
    );
    draw_text(&mut img, (cb - 14) as i64, (top - 12) as i64, "weight", INK);
    draw_text(
        &mut img,
        (left + w + 4) as i64,
        (top + h + 22) as i64,
        "black 0, white 1",
        INK,
    );

    // Axes: ticks every quarter, labelled in tokens (or blocks).
    for i in 0..=4u32 {
        let x = left + (w.saturating_sub(1)) * i / 4;
        let val = (cols.saturating_sub(1)) as u32 * i / 4;
        fill(&mut img, x, top + h, 1, 4, INK);
        let label = val.to_string();
        draw_text(
            &mut img,
            x as i64 - 4 * label.len() as i64,
            (top + h + 6) as i64,
            &label,
            INK,
        );
        let y = top + (h.saturating_sub(1)) * i / 4;
        let tval = ((rows.saturating_sub(1)) * group) as u32 * i / 4;
        fill(&mut img, left - 4, y, 4, 1, INK);
        let label = tval.to_string();
        draw_text(
            &mut img,
            (left - 6) as i64 - 8 * label.len() as i64,
            y as i64 - 3,
            &label,
            INK,
        );
    }
    let xlabel = if token_level {
        "key position (cyan tint: kept blocks)".to_string()
    } else {
        format!("key block of {} (cyan tint: kept)", d.block)
    };
    draw_text(&mut img, left as i64, (top + h + 22) as i64, &xlabel, INK);
    draw_text(&mut img, 4, (top - 12) as i64, "query", INK);
    for (i, line) in d.title.iter().enumerate() {
        draw_text(&mut img, 4, 6 + 12 * i as i64, line, INK);
    }
    Ok(img)
}

/// `img` as PNG bytes.
pub fn png_bytes(img: &RgbImage) -> Result<Vec<u8>> {
    let err = |e: png::EncodingError| crate::Error::Gpu(format!("encoding a PNG: {e}"));
    let mut buf = Vec::new();
    let mut enc = png::Encoder::new(&mut buf, img.width(), img.height());
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc.write_header().map_err(err)?;
    w.write_image_data(img.as_raw()).map_err(err)?;
    w.finish().map_err(err)?;
    Ok(buf)
}

/// Write `img` to `path` as a PNG, all or nothing (`files::write_atomic`).
pub fn save_png(img: &RgbImage, path: &std::path::Path) -> Result<()> {
    crate::files::write_atomic(path, &png_bytes(img)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_round_trip_keeps_every_pixel() {
        // Not square, and every pixel different: rows and channels cannot swap unnoticed.
        let (w, h) = (7u32, 3u32);
        let mut img = RgbImage::from_pixel(w, h, BG);
        for y in 0..h {
            for x in 0..w {
                img.put_pixel(x, y, Rgb([x as u8 * 30, y as u8 * 80, (x + w * y) as u8]));
            }
        }
        assert_eq!(img.get_pixel(6, 2), Rgb([180, 160, 20]));
        // Off the edges nothing is drawn (and nothing wraps to the next row).
        let before = img.clone();
        for (x, y) in [(-1, 0), (7, 0), (0, -1), (0, 3), (7, 1)] {
            img.put_clipped(x, y, INK);
        }
        assert_eq!(img, before);
        let bytes = png_bytes(&img).unwrap();
        let mut dec = png::Decoder::new(std::io::Cursor::new(bytes))
            .read_info()
            .unwrap();
        let mut out = vec![0; dec.output_buffer_size().unwrap()];
        let info = dec.next_frame(&mut out).unwrap();
        assert_eq!((info.width, info.height), (w, h));
        assert_eq!(info.color_type, png::ColorType::Rgb);
        assert_eq!(&out[..info.buffer_size()], img.as_raw());
    }

    #[test]
    fn hidden_kept_and_dropped_cells_look_different() {
        // Two tokens at positions 30, 31 over 32 keys in blocks of 16; token 31 keeps block 1 only.
        let probs: Vec<f64> = (0..2 * 32)
            .map(|i| if i % 32 < 31 { 1.0 / 31.0 } else { 0.0 })
            .collect();
        let mass = [0.5f32, 0.5, 0.5, 0.5];
        let data = MapData {
            title: vec!["t".into()],
            seq_q: 2,
            seq_k: 32,
            q_offset: 29,
            block: 16,
            causal: true,
            probs: Some(&probs),
            block_mass: &mass,
            selection: &[1, SENTINEL, 1, SENTINEL],
            k: 2,
            sparsity: &[0.5, 0.5],
        };
        let img = render_map(&data).unwrap();
        let (sx, sy) = (640 / 32, 32);
        let top = 28 + 12;
        let at = |c: u32, r: u32| img.get_pixel(64 + c * sx + sx / 2, top + r * sy + sy / 2);
        // Key 31 is in the future of token 0 (position 29 + 0 = 29... sees keys 0..=29).
        assert_eq!(at(31, 0), HIDDEN);
        // Same weight, block 0 dropped vs block 1 kept: the kept one is tinted.
        assert_eq!(at(3, 1), magma(log_scale(1.0 / 31.0)));
        assert_ne!(at(20, 1), at(3, 1));
    }
}
