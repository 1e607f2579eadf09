//! Full attention in plain Rust with f64 accumulation: the ground truth for the GPU kernels.
//!
//! O_i = Σ_j softmax_j(s·q_i·k_j + b_j) v_j over the keys j visible to query i, with an
//! optional additive per-key bias b `[batch, kv_heads, seq_k]` (NOSA's eviction score; 0 when
//! absent), LSE_i = ln Σ_j exp(s·q_i·k_j + b_j), and the gradients by the chain rule:
//! dV_j = Σ_i P_ij dO_i, dP_ij = dO_i·v_j, dS_ij = P_ij (dP_ij − dO_i·O_i),
//! dQ_i = s Σ_j dS_ij k_j, dK_j = s Σ_i dS_ij q_i, d b_j = Σ_i dS_ij (sums over the query heads
//! of a group too).

use crate::error::{Result, invalid};
use crate::problem::{AttnOptions, AttnShape};

/// Forward results: O `[b, hq, sq, d]` and LSE `[b, hq, sq]` (natural log).
#[derive(Clone, Debug)]
pub struct Forward {
    pub o: Vec<f32>,
    pub lse: Vec<f32>,
}

/// Gradients with the shapes of q, k, v, and of the bias when there was one.
#[derive(Clone, Debug)]
pub struct Grads {
    pub dq: Vec<f32>,
    pub dk: Vec<f32>,
    pub dv: Vec<f32>,
    /// `[batch, kv_heads, seq_k]`; `None` without a bias.
    pub dbias: Option<Vec<f32>>,
}

/// Checks the length of an optional bias `[batch, kv_heads, seq_k]`.
pub(crate) fn bias_len(shape: &AttnShape, bias: Option<&[f32]>) -> (&'static str, usize, usize) {
    (
        "bias",
        bias.map_or(0, |b| b.len()),
        bias.map_or(0, |_| shape.batch * shape.heads_kv * shape.seq_k),
    )
}

fn check_lens(shape: &AttnShape, opts: &AttnOptions, parts: &[(&str, usize, usize)]) -> Result<()> {
    shape.validate(opts)?;
    for &(name, got, want) in parts {
        if got != want {
            invalid!("{name} has {got} elements, the shape {shape:?} needs {want}");
        }
    }
    Ok(())
}

/// Visible key range `0..end` of query `i`.
fn key_end(shape: &AttnShape, causal: bool, i: usize) -> usize {
    if causal {
        (shape.q_offset() + i + 1).min(shape.seq_k)
    } else {
        shape.seq_k
    }
}

/// Probabilities P_i· (f64) of one query row over keys `0..end` of one kv head (its keys and
/// its slice of the bias), with its LSE.
fn row_probs(
    q: &[f32],
    k: &[f32],
    bias: Option<&[f32]>,
    d: usize,
    end: usize,
    scale: f64,
) -> (Vec<f64>, f64) {
    let logits: Vec<f64> = (0..end)
        .map(|j| {
            let kj = &k[j * d..(j + 1) * d];
            scale
                * q.iter()
                    .zip(kj)
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum::<f64>()
                + bias.map_or(0.0, |b| b[j] as f64)
        })
        .collect();
    let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = logits.iter().map(|&s| (s - m).exp()).sum();
    let lse = m + sum.ln();
    (logits.iter().map(|&s| (s - lse).exp()).collect(), lse)
}

pub fn forward(
    shape: &AttnShape,
    opts: &AttnOptions,
    q: &[f32],
    k: &[f32],
    v: &[f32],
) -> Result<Forward> {
    forward_biased(shape, opts, q, k, v, None)
}

/// [`forward`] with an optional per-key bias `[batch, kv_heads, seq_k]` on the logits.
pub fn forward_biased(
    shape: &AttnShape,
    opts: &AttnOptions,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    bias: Option<&[f32]>,
) -> Result<Forward> {
    check_lens(
        shape,
        opts,
        &[
            ("q", q.len(), shape.q_len()),
            ("k", k.len(), shape.kv_len()),
            ("v", v.len(), shape.kv_len()),
            bias_len(shape, bias),
        ],
    )?;
    let (d, sq, sk, g) = (shape.head_dim, shape.seq_q, shape.seq_k, shape.group());
    let scale = opts.scale_for(d) as f64;
    let mut o = vec![0f32; shape.q_len()];
    let mut lse = vec![0f32; shape.lse_len()];
    for bh in 0..shape.batch * shape.heads_q {
        let kv = bh / g; // (b, hq) flattened / G == (b, hkv) flattened
        let kh = &k[kv * sk * d..(kv + 1) * sk * d];
        let vh = &v[kv * sk * d..(kv + 1) * sk * d];
        let bh_bias = bias.map(|b| &b[kv * sk..(kv + 1) * sk]);
        for i in 0..sq {
            let row = bh * sq + i;
            let qi = &q[row * d..(row + 1) * d];
            let (p, l) = row_probs(qi, kh, bh_bias, d, key_end(shape, opts.causal, i), scale);
            lse[row] = l as f32;
            for c in 0..d {
                let acc: f64 = p
                    .iter()
                    .enumerate()
                    .map(|(j, &pj)| pj * vh[j * d + c] as f64)
                    .sum();
                o[row * d + c] = acc as f32;
            }
        }
    }
    Ok(Forward { o, lse })
}

/// Gradients of `Σ O·dO` with respect to q, k, v (recomputes everything in f64).
pub fn backward(
    shape: &AttnShape,
    opts: &AttnOptions,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    d_o: &[f32],
) -> Result<Grads> {
    backward_biased(shape, opts, q, k, v, None, d_o)
}

/// [`backward`] of [`forward_biased`]: also d bias when a bias is given.
pub fn backward_biased(
    shape: &AttnShape,
    opts: &AttnOptions,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    bias: Option<&[f32]>,
    d_o: &[f32],
) -> Result<Grads> {
    check_lens(
        shape,
        opts,
        &[
            ("q", q.len(), shape.q_len()),
            ("k", k.len(), shape.kv_len()),
            ("v", v.len(), shape.kv_len()),
            bias_len(shape, bias),
            ("dO", d_o.len(), shape.q_len()),
        ],
    )?;
    let (d, sq, sk, g) = (shape.head_dim, shape.seq_q, shape.seq_k, shape.group());
    let scale = opts.scale_for(d) as f64;
    let mut dq = vec![0f64; shape.q_len()];
    let mut dk = vec![0f64; shape.kv_len()];
    let mut dv = vec![0f64; shape.kv_len()];
    let mut db = vec![0f64; bias.map_or(0, |b| b.len())];
    for bh in 0..shape.batch * shape.heads_q {
        let kv = bh / g;
        let kbase = kv * sk * d;
        let kh = &k[kbase..kbase + sk * d];
        let vh = &v[kbase..kbase + sk * d];
        let bh_bias = bias.map(|b| &b[kv * sk..(kv + 1) * sk]);
        for i in 0..sq {
            let row = bh * sq + i;
            let qi = &q[row * d..(row + 1) * d];
            let doi = &d_o[row * d..(row + 1) * d];
            let (p, _) = row_probs(qi, kh, bh_bias, d, key_end(shape, opts.causal, i), scale);
            let dp: Vec<f64> = (0..p.len())
                .map(|j| {
                    (0..d)
                        .map(|c| doi[c] as f64 * vh[j * d + c] as f64)
                        .sum::<f64>()
                })
                .collect();
            // D_i = dO_i·O_i = Σ_j P_ij dP_ij
            let di: f64 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
            for (j, (&pj, &dpj)) in p.iter().zip(&dp).enumerate() {
                let ds = pj * (dpj - di);
                if bias.is_some() {
                    db[kv * sk + j] += ds;
                }
                for c in 0..d {
                    dv[kbase + j * d + c] += pj * doi[c] as f64;
                    dq[row * d + c] += scale * ds * kh[j * d + c] as f64;
                    dk[kbase + j * d + c] += scale * ds * qi[c] as f64;
                }
            }
        }
    }
    let f = |x: Vec<f64>| x.into_iter().map(|v| v as f32).collect();
    Ok(Grads {
        dq: f(dq),
        dk: f(dk),
        dv: f(dv),
        dbias: bias.map(|_| f(db)),
    })
}

/// Full attention weights of query row-block `bh` (flattened batch x query head): `[seq_q,
/// seq_k]`, zero for keys a query does not see. For maps of real activations.
pub fn probabilities(
    shape: &AttnShape,
    opts: &AttnOptions,
    q: &[f32],
    k: &[f32],
    bh: usize,
) -> Result<Vec<f64>> {
    check_lens(
        shape,
        opts,
        &[
            ("q", q.len(), shape.q_len()),
            ("k", k.len(), shape.kv_len()),
        ],
    )?;
    if bh >= shape.batch * shape.heads_q {
        invalid!(
            "row block {bh} is past the {} (batch, head) pairs",
            shape.batch * shape.heads_q
        );
    }
    let (d, sq, sk) = (shape.head_dim, shape.seq_q, shape.seq_k);
    let kv = bh / shape.group();
    let kh = &k[kv * sk * d..(kv + 1) * sk * d];
    let scale = opts.scale_for(d) as f64;
    let mut out = vec![0.0; sq * sk];
    for i in 0..sq {
        let row = bh * sq + i;
        let (p, _) = row_probs(
            &q[row * d..(row + 1) * d],
            kh,
            None,
            d,
            key_end(shape, opts.causal, i),
            scale,
        );
        out[i * sk..i * sk + p.len()].copy_from_slice(&p);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::problem::{SENTINEL, SparseOptions};
    use crate::reference::Rng;

    /// Σ O·dO for a bias, in f64 from the f32 outputs.
    fn loss(o: &[f32], d_o: &[f32]) -> f64 {
        o.iter().zip(d_o).map(|(&a, &b)| a as f64 * b as f64).sum()
    }

    /// d bias of the full and the sparse references against central finite differences of
    /// Σ O·dO (GQA 3:1, causal, odd length; sparse with a sentinel-padded selection).
    #[test]
    fn dbias_matches_finite_differences() {
        let s = AttnShape::new(1, 3, 1, 13, 16);
        let mut rng = Rng::new(7);
        let q = rng.normal_vec(s.q_len(), 1.0);
        let k = rng.normal_vec(s.kv_len(), 1.0);
        let v = rng.normal_vec(s.kv_len(), 1.0);
        let d_o = rng.normal_vec(s.q_len(), 1.0);
        let bias = rng.normal_vec(s.seq_k, 2.0);
        let opts = AttnOptions::causal(true);
        let sp = SparseOptions {
            block: 16,
            causal: true,
            scale: None,
        };
        // Blocks of 16 over 13 keys: one block; every other token selects nothing.
        let sel: Vec<u32> = (0..s.seq_q)
            .map(|t| if t % 2 == 0 { 0 } else { SENTINEL })
            .collect();
        let full = |b: &[f32]| {
            loss(
                &forward_biased(&s, &opts, &q, &k, &v, Some(b)).unwrap().o,
                &d_o,
            )
        };
        let sparse = |b: &[f32]| {
            let f = crate::reference::sparse::forward(&s, &sp, &q, &k, &v, &sel, 1, Some(b));
            loss(&f.unwrap().o, &d_o)
        };
        let g_full = backward_biased(&s, &opts, &q, &k, &v, Some(&bias), &d_o).unwrap();
        let g_sparse =
            crate::reference::sparse::backward(&s, &sp, &q, &k, &v, &sel, 1, Some(&bias), &d_o)
                .unwrap();
        for (name, f, g) in [
            (
                "full",
                &full as &dyn Fn(&[f32]) -> f64,
                g_full.dbias.unwrap(),
            ),
            ("sparse", &sparse, g_sparse.dbias.unwrap()),
        ] {
            for j in 0..s.seq_k {
                let h = 1e-2f32;
                let (mut up, mut dn) = (bias.clone(), bias.clone());
                up[j] += h;
                dn[j] -= h;
                let fd = (f(&up) - f(&dn)) / (2.0 * h as f64);
                let err = (fd - g[j] as f64).abs();
                assert!(
                    err <= 2e-3 * (1.0 + fd.abs()),
                    "{name} d bias[{j}] = {} against finite difference {fd}",
                    g[j]
                );
            }
        }
    }
}
