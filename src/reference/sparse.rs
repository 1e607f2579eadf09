//! Block-sparse attention in plain Rust (f64): the ground truth for `shaders/sparse_fwd.wgsl`.
//!
//! Token t (position p = seq_k − seq_q + t) of query head h attends to the keys of the blocks
//! its kv group selected (`sel[b, h / G, t, ..]`, SENTINEL = none), causal (key ≤ p) when asked,
//! with an optional additive per-key bias `bias[b, hkv, key]` on the logits:
//! O = Σ_j softmax_j(s·q·k_j + bias_j) v_j, LSE = ln Σ_j exp(s·q·k_j + bias_j).
//! A row whose selection holds no visible key gets O = 0 and LSE = −∞.

use crate::error::{Result, invalid};
use crate::problem::AttnShape;
use crate::problem::{SENTINEL, SparseOptions};
use crate::reference::attention::Forward;

/// The keys token `t` attends to, in ascending order.
pub fn visible_keys(
    shape: &AttnShape,
    opts: &SparseOptions,
    blocks: &[u32],
    t: usize,
) -> Vec<usize> {
    let end = if opts.causal {
        (shape.q_offset() + t + 1).min(shape.seq_k)
    } else {
        shape.seq_k
    };
    let nb = shape.seq_k.div_ceil(opts.block) as u32;
    let mut keys: Vec<usize> = blocks
        .iter()
        .filter(|&&b| b != SENTINEL && b < nb)
        .flat_map(|&b| {
            let k0 = b as usize * opts.block;
            k0..(k0 + opts.block).min(end)
        })
        .collect();
    keys.sort_unstable();
    keys.dedup();
    keys
}

/// Softmax weights of one query row over `keys` of kv head `kv` (with the optional bias), and the
/// row's LSE.
#[allow(clippy::too_many_arguments)]
fn row_probs(
    shape: &AttnShape,
    scale: f64,
    qi: &[f32],
    k: &[f32],
    kv: usize,
    keys: &[usize],
    bias: Option<&[f32]>,
) -> (Vec<f64>, f64) {
    let (d, sk) = (shape.head_dim, shape.seq_k);
    let logits: Vec<f64> = keys
        .iter()
        .map(|&j| {
            let kj = &k[(kv * sk + j) * d..(kv * sk + j + 1) * d];
            let dot: f64 = qi.iter().zip(kj).map(|(&a, &b)| a as f64 * b as f64).sum();
            scale * dot + bias.map_or(0.0, |b| b[kv * sk + j] as f64)
        })
        .collect();
    let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let lse = m + logits.iter().map(|&x| (x - m).exp()).sum::<f64>().ln();
    (logits.iter().map(|&x| (x - lse).exp()).collect(), lse)
}

#[allow(clippy::too_many_arguments)]
pub fn forward(
    shape: &AttnShape,
    opts: &SparseOptions,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    sel: &[u32],
    nsel: usize,
    bias: Option<&[f32]>,
) -> Result<Forward> {
    opts.validate(shape, nsel)?;
    let rows_kv = shape.batch * shape.heads_kv * shape.seq_q;
    for (name, got, want) in [
        ("q", q.len(), shape.q_len()),
        ("k", k.len(), shape.kv_len()),
        ("v", v.len(), shape.kv_len()),
        ("selection", sel.len(), rows_kv * nsel),
        crate::reference::attention::bias_len(shape, bias),
    ] {
        if got != want {
            invalid!("{name} has {got} elements, the shape {shape:?} needs {want}");
        }
    }
    let (d, sq, sk, g) = (shape.head_dim, shape.seq_q, shape.seq_k, shape.group());
    let scale = opts.attn().scale_for(d) as f64;
    let mut o = vec![0f32; shape.q_len()];
    let mut lse = vec![f32::NEG_INFINITY; shape.lse_len()];
    for bh in 0..shape.batch * shape.heads_q {
        let kv = bh / g;
        for t in 0..sq {
            let srow = (kv * sq + t) * nsel;
            let keys = visible_keys(shape, opts, &sel[srow..srow + nsel], t);
            if keys.is_empty() {
                continue;
            }
            let row = bh * sq + t;
            let (p, l) = row_probs(shape, scale, &q[row * d..(row + 1) * d], k, kv, &keys, bias);
            lse[row] = l as f32;
            for c in 0..d {
                let acc: f64 = keys
                    .iter()
                    .zip(&p)
                    .map(|(&j, &pj)| pj * v[(kv * sk + j) * d + c] as f64)
                    .sum();
                o[row * d + c] = acc as f32;
            }
        }
    }
    Ok(Forward { o, lse })
}

/// Gradients of `Σ O·dO` with respect to q, k, v (and the bias, when given: d b_j = Σ dS_ij
/// over the group's query heads and the tokens that see key j) for [`forward`] (recomputed in
/// f64).
#[allow(clippy::too_many_arguments)]
pub fn backward(
    shape: &AttnShape,
    opts: &SparseOptions,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    sel: &[u32],
    nsel: usize,
    bias: Option<&[f32]>,
    d_o: &[f32],
) -> Result<crate::reference::attention::Grads> {
    // Validates everything but dO.
    forward(shape, opts, q, k, v, sel, nsel, bias)?;
    if d_o.len() != shape.q_len() {
        invalid!(
            "dO has {} elements, the shape needs {}",
            d_o.len(),
            shape.q_len()
        );
    }
    let (d, sq, sk, g) = (shape.head_dim, shape.seq_q, shape.seq_k, shape.group());
    let scale = opts.attn().scale_for(d) as f64;
    let mut dq = vec![0f64; shape.q_len()];
    let mut dk = vec![0f64; shape.kv_len()];
    let mut dv = vec![0f64; shape.kv_len()];
    let mut db = vec![0f64; bias.map_or(0, |b| b.len())];
    for bh in 0..shape.batch * shape.heads_q {
        let kv = bh / g;
        for t in 0..sq {
            let srow = (kv * sq + t) * nsel;
            let keys = visible_keys(shape, opts, &sel[srow..srow + nsel], t);
            if keys.is_empty() {
                continue;
            }
            let row = bh * sq + t;
            let qi = &q[row * d..(row + 1) * d];
            let doi = &d_o[row * d..(row + 1) * d];
            let kr = |j: usize| (kv * sk + j) * d;
            let (p, _) = row_probs(shape, scale, qi, k, kv, &keys, bias);
            let dp: Vec<f64> = keys
                .iter()
                .map(|&j| (0..d).map(|c| doi[c] as f64 * v[kr(j) + c] as f64).sum())
                .collect();
            let di: f64 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
            for (n, &j) in keys.iter().enumerate() {
                let ds = p[n] * (dp[n] - di);
                if bias.is_some() {
                    db[kv * sk + j] += ds;
                }
                for c in 0..d {
                    dv[kr(j) + c] += p[n] * doi[c] as f64;
                    dq[row * d + c] += scale * ds * k[kr(j) + c] as f64;
                    dk[kr(j) + c] += scale * ds * qi[c] as f64;
                }
            }
        }
    }
    let f = |x: Vec<f64>| x.into_iter().map(|v| v as f32).collect();
    Ok(crate::reference::attention::Grads {
        dq: f(dq),
        dk: f(dk),
        dv: f(dv),
        dbias: bias.map(|_| f(db)),
    })
}
