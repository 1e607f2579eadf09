//! A Llama model's forward pass straight from a GGUF file, in f64: the ground truth for the
//! models `train::llama` loads. RMSNorm (x / sqrt(mean x² + eps) · γ), RoPE on adjacent pairs
//! (pair i of a head rotated by pos · base^(-2i/head_dim): llama.cpp's layout, which its
//! converter gives q and k), grouped-query causal attention with scale 1/sqrt(head_dim),
//! SwiGLU (W_down (silu(W_gate x) ⊙ W_up x)), the output head tied to the embedding unless the
//! file has `output.weight`. Slow (a matrix-vector product per token and weight): tiny models.

use crate::error::Result;
use crate::gguf::{Gguf, LlamaParams};

/// `y = W x` for a GGUF weight of `rows` rows of `x.len()` values.
pub fn matvec(w: &[f32], x: &[f64]) -> Vec<f64> {
    w.chunks_exact(x.len())
        .map(|row| row.iter().zip(x).map(|(a, b)| *a as f64 * b).sum())
        .collect()
}

/// One row of RMSNorm: `x / sqrt(mean(x²) + eps) · γ`.
pub fn rms_norm(x: &[f64], gamma: &[f32], eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let r = 1.0 / (ms + eps).sqrt();
    x.iter()
        .zip(gamma)
        .map(|(v, g)| v * r * *g as f64)
        .collect()
}

/// Rotates each head of `x` (heads of `dh` values) for position `pos`.
pub fn rope(x: &mut [f64], dh: usize, pos: usize, base: f64) {
    for head in x.chunks_exact_mut(dh) {
        for i in 0..dh / 2 {
            let a = pos as f64 * base.powf(-2.0 * i as f64 / dh as f64);
            let (s, c) = a.sin_cos();
            let (x0, x1) = (head[2 * i], head[2 * i + 1]);
            head[2 * i] = x0 * c - x1 * s;
            head[2 * i + 1] = x0 * s + x1 * c;
        }
    }
}

/// SwiGLU's activation: `silu(g) · u`.
pub fn swiglu(g: f64, u: f64) -> f64 {
    g / (1.0 + (-g).exp()) * u
}

/// Logits `[tokens.len(), vocab]` (row-major) after each of `tokens`, causal.
pub fn logits(g: &Gguf, bytes: &[u8], tokens: &[u32]) -> Result<Vec<f64>> {
    let p = LlamaParams::from_gguf(g)?;
    let w = |name: &str| g.read_f32(bytes, name);
    let (d, dh, hq, hkv) = (p.d_model, p.head_dim, p.heads_q, p.heads_kv);
    let emb = w("token_embd.weight")?;
    let mut xs: Vec<Vec<f64>> = tokens
        .iter()
        .map(|&t| {
            let t = t as usize;
            emb[t * d..(t + 1) * d].iter().map(|&v| v as f64).collect()
        })
        .collect();
    for l in 0..p.layers {
        let n = |t: &str| format!("blk.{l}.{t}.weight");
        let (wq, wk, wv, wo) = (
            w(&n("attn_q"))?,
            w(&n("attn_k"))?,
            w(&n("attn_v"))?,
            w(&n("attn_output"))?,
        );
        let (an, fnorm) = (w(&n("attn_norm"))?, w(&n("ffn_norm"))?);
        let (wg, wu, wd) = (w(&n("ffn_gate"))?, w(&n("ffn_up"))?, w(&n("ffn_down"))?);
        let mut qs = vec![];
        let mut ks = vec![];
        let mut vs = vec![];
        for (pos, x) in xs.iter().enumerate() {
            let h = rms_norm(x, &an, p.rms_eps);
            let (mut q, mut k) = (matvec(&wq, &h), matvec(&wk, &h));
            rope(&mut q, dh, pos, p.rope_base);
            rope(&mut k, dh, pos, p.rope_base);
            qs.push(q);
            ks.push(k);
            vs.push(matvec(&wv, &h));
        }
        let scale = 1.0 / (dh as f64).sqrt();
        for (t, x) in xs.iter_mut().enumerate() {
            let mut o = vec![0.0; d];
            for h in 0..hq {
                let kvh = h / (hq / hkv);
                let q = &qs[t][h * dh..(h + 1) * dh];
                let s: Vec<f64> = (0..=t)
                    .map(|j| {
                        let k = &ks[j][kvh * dh..(kvh + 1) * dh];
                        q.iter().zip(k).map(|(a, b)| a * b).sum::<f64>() * scale
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|v| (v - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for (j, pj) in e.iter().enumerate() {
                    let v = &vs[j][kvh * dh..(kvh + 1) * dh];
                    for c in 0..dh {
                        o[h * dh + c] += pj / z * v[c];
                    }
                }
            }
            let a = matvec(&wo, &o);
            x.iter_mut().zip(&a).for_each(|(x, a)| *x += a);
            let h = rms_norm(x, &fnorm, p.rms_eps);
            let (gt, up) = (matvec(&wg, &h), matvec(&wu, &h));
            let act: Vec<f64> = gt.iter().zip(&up).map(|(&g, &u)| swiglu(g, u)).collect();
            let m = matvec(&wd, &act);
            x.iter_mut().zip(&m).for_each(|(x, m)| *x += m);
        }
    }
    let on = w("output_norm.weight")?;
    let head = match g.tensors.iter().any(|t| t.name == "output.weight") {
        true => w("output.weight")?,
        false => emb,
    };
    Ok(xs
        .iter()
        .flat_map(|x| matvec(&head, &rms_norm(x, &on, p.rms_eps)))
        .collect())
}
