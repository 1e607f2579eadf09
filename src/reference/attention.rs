//! Full attention in plain Rust with f64 accumulation: the ground truth for the GPU kernels.
//!
//! O_i = Σ_j softmax_j(s·q_i·k_j) v_j over the keys j visible to query i,
//! LSE_i = ln Σ_j exp(s·q_i·k_j), and the gradients by the chain rule:
//! dV_j = Σ_i P_ij dO_i, dP_ij = dO_i·v_j, dS_ij = P_ij (dP_ij − dO_i·O_i),
//! dQ_i = s Σ_j dS_ij k_j, dK_j = s Σ_i dS_ij q_i (summed over the query heads of a group).

use crate::error::{Result, invalid};
use crate::problem::{AttnOptions, AttnShape};

/// Forward results: O `[b, hq, sq, d]` and LSE `[b, hq, sq]` (natural log).
#[derive(Clone, Debug)]
pub struct Forward {
    pub o: Vec<f32>,
    pub lse: Vec<f32>,
}

/// Gradients with the shapes of q, k, v.
#[derive(Clone, Debug)]
pub struct Grads {
    pub dq: Vec<f32>,
    pub dk: Vec<f32>,
    pub dv: Vec<f32>,
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

/// Probabilities P_i· (f64) of one query row, with its LSE.
fn row_probs(q: &[f32], k: &[f32], d: usize, end: usize, scale: f64) -> (Vec<f64>, f64) {
    let logits: Vec<f64> = (0..end)
        .map(|j| {
            let kj = &k[j * d..(j + 1) * d];
            scale
                * q.iter()
                    .zip(kj)
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum::<f64>()
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
    check_lens(
        shape,
        opts,
        &[
            ("q", q.len(), shape.q_len()),
            ("k", k.len(), shape.kv_len()),
            ("v", v.len(), shape.kv_len()),
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
        for i in 0..sq {
            let row = bh * sq + i;
            let qi = &q[row * d..(row + 1) * d];
            let (p, l) = row_probs(qi, kh, d, key_end(shape, opts.causal, i), scale);
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
    check_lens(
        shape,
        opts,
        &[
            ("q", q.len(), shape.q_len()),
            ("k", k.len(), shape.kv_len()),
            ("v", v.len(), shape.kv_len()),
            ("dO", d_o.len(), shape.q_len()),
        ],
    )?;
    let (d, sq, sk, g) = (shape.head_dim, shape.seq_q, shape.seq_k, shape.group());
    let scale = opts.scale_for(d) as f64;
    let mut dq = vec![0f64; shape.q_len()];
    let mut dk = vec![0f64; shape.kv_len()];
    let mut dv = vec![0f64; shape.kv_len()];
    for bh in 0..shape.batch * shape.heads_q {
        let kv = bh / g;
        let kbase = kv * sk * d;
        let kh = &k[kbase..kbase + sk * d];
        let vh = &v[kbase..kbase + sk * d];
        for i in 0..sq {
            let row = bh * sq + i;
            let qi = &q[row * d..(row + 1) * d];
            let doi = &d_o[row * d..(row + 1) * d];
            let (p, _) = row_probs(qi, kh, d, key_end(shape, opts.causal, i), scale);
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
            d,
            key_end(shape, opts.causal, i),
            scale,
        );
        out[i * sk..i * sk + p.len()].copy_from_slice(&p);
    }
    Ok(out)
}
