//! SSA's alignment loss in plain Rust (f64), the ground truth for `shaders/align.wgsl`
//! (PAPERS.md §2): L = SmoothL1(h_full, sg(h_sparse)) + SmoothL1(h_sparse, sg(h_full)), means over
//! all elements, and its gradients (each stop-gradient leaves one direction per stream).

use crate::error::{Result, invalid};

/// SmoothL1 of one difference: d²/(2β) if |d| < β, else |d| − β/2.
pub fn smooth_l1(d: f64, beta: f64) -> f64 {
    if d.abs() < beta {
        0.5 * d * d / beta
    } else {
        d.abs() - 0.5 * beta
    }
}

/// Its derivative: d/β clamped to [−1, 1].
pub fn smooth_l1_grad(d: f64, beta: f64) -> f64 {
    (d / beta).clamp(-1.0, 1.0)
}

/// Loss and the gradients with respect to h_full and h_sparse, times `scale`.
pub struct Align {
    pub loss: f64,
    pub g_full: Vec<f64>,
    pub g_sparse: Vec<f64>,
}

pub fn align(h_full: &[f32], h_sparse: &[f32], beta: f64, scale: f64) -> Result<Align> {
    if h_full.len() != h_sparse.len() || h_full.is_empty() {
        invalid!(
            "h_full ({}) and h_sparse ({}) must be non-empty and of one length",
            h_full.len(),
            h_sparse.len()
        );
    }
    if beta.is_nan() || beta <= 0.0 {
        invalid!("SmoothL1 beta must be positive, got {beta}");
    }
    let n = h_full.len() as f64;
    let d: Vec<f64> = h_full
        .iter()
        .zip(h_sparse)
        .map(|(&a, &b)| a as f64 - b as f64)
        .collect();
    // SmoothL1(h_full, sg(h_sparse)) and SmoothL1(h_sparse, sg(h_full)): equal values.
    let sparsity: f64 = d.iter().map(|&x| smooth_l1(x, beta)).sum::<f64>() / n;
    let commit: f64 = d.iter().map(|&x| smooth_l1(-x, beta)).sum::<f64>() / n;
    Ok(Align {
        loss: sparsity + commit,
        // d/dh_full: only the sparsity term (h_sparse is constant there), and vice versa.
        g_full: d
            .iter()
            .map(|&x| scale * smooth_l1_grad(x, beta) / n)
            .collect(),
        g_sparse: d
            .iter()
            .map(|&x| scale * smooth_l1_grad(-x, beta) / n)
            .collect(),
    })
}
