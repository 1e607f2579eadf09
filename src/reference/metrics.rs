//! Attention metrics in plain Rust (f64), the ground truth for `shaders/metrics.wgsl`
//! (PAPERS.md §2, "Metrics"). For query head h and token t, with the full attention
//! a(t, j) = softmax_j(s·q·k_j) over the visible keys:
//! - block mass: m(t, b) = Σ_{j in block b} a(t, j), the block-level attention map;
//! - attention sparsity: the share of the full mass inside the blocks the selector kept,
//!   S(t) = Σ_b m(t, b)·[b selected]; δ(t) = 1 − S(t) bounds the sparse output's error;
//! - entropy: H(t) = −Σ_j a(t, j) ln a(t, j).
//!
//! KL(full ‖ sparse) is infinite whenever a dropped key has mass (the sparse distribution is 0
//! there). The finite direction follows from S: sparse attention is full attention renormalised
//! on the kept keys, so KL(sparse ‖ full) = −ln S(t). [`kl_sparse_full`] gives it.

use crate::error::{Result, invalid};
use crate::problem::{AttnShape, SENTINEL, SparseOptions};

/// Per-(batch, query head, token) metrics; `block_mass` is `[b, hq, seq_q, nb]`.
#[derive(Clone, Debug)]
pub struct Metrics {
    pub block_mass: Vec<f64>,
    pub sparsity: Vec<f64>,
    pub entropy: Vec<f64>,
}

/// KL(sparse ‖ full) = −ln S, per row.
pub fn kl_sparse_full(sparsity: &[f64]) -> Vec<f64> {
    sparsity.iter().map(|&s| -s.ln()).collect()
}

/// Metrics of full attention over q, k (mask and scale from `opts`) against a selection of
/// `nsel` blocks of `opts.block` keys per (token, kv head).
pub fn metrics(
    shape: &AttnShape,
    opts: &SparseOptions,
    q: &[f32],
    k: &[f32],
    sel: &[u32],
    nsel: usize,
) -> Result<Metrics> {
    opts.validate(shape, nsel)?;
    let block = opts.block;
    if q.len() != shape.q_len()
        || k.len() != shape.kv_len()
        || sel.len() != shape.batch * shape.heads_kv * shape.seq_q * nsel
    {
        invalid!("q, k or the selection do not match {shape:?} with {nsel} blocks per row");
    }
    let (d, sq, sk, g) = (shape.head_dim, shape.seq_q, shape.seq_k, shape.group());
    let nb = sk.div_ceil(block);
    let scale = opts.attn().scale_for(d) as f64;
    let rows = shape.batch * shape.heads_q * sq;
    let mut out = Metrics {
        block_mass: vec![0.0; rows * nb],
        sparsity: vec![0.0; rows],
        entropy: vec![0.0; rows],
    };
    for bh in 0..shape.batch * shape.heads_q {
        let kv = bh / g;
        for t in 0..sq {
            let row = bh * sq + t;
            let end = if opts.causal {
                (shape.q_offset() + t + 1).min(sk)
            } else {
                sk
            };
            let qi = &q[row * d..(row + 1) * d];
            let logits: Vec<f64> = (0..end)
                .map(|j| {
                    let kj = &k[(kv * sk + j) * d..(kv * sk + j + 1) * d];
                    scale
                        * qi.iter()
                            .zip(kj)
                            .map(|(&a, &b)| a as f64 * b as f64)
                            .sum::<f64>()
                })
                .collect();
            let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = logits.iter().map(|&x| (x - m).exp()).sum();
            let srow = &sel[(kv * sq + t) * nsel..(kv * sq + t + 1) * nsel];
            let mass = &mut out.block_mass[row * nb..(row + 1) * nb];
            let mut h = 0.0;
            for (j, &x) in logits.iter().enumerate() {
                let a = (x - m).exp() / z;
                mass[j / block] += a;
                if a > 0.0 {
                    h -= a * a.ln();
                }
            }
            out.entropy[row] = h;
            out.sparsity[row] = srow
                .iter()
                .filter(|&&b| b != SENTINEL && (b as usize) < nb)
                .map(|&b| mass[b as usize])
                .sum();
        }
    }
    Ok(out)
}
