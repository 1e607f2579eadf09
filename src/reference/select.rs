//! Block selection in plain Rust (f64): the ground truth for `shaders/block_select.wgsl`.
//!
//! For query token t at absolute position p = seq_k − seq_q + t and kv head g (PAPERS.md §1):
//! - block keys k̄_j = mean of the keys of block j (blocks of B tokens; the last may be partial);
//! - candidates: blocks that start at or before p (causal), or every block;
//! - causal scoring sees no key after p (NOSA.md §2): only *complete* pooling windows (every
//!   key at or before p) are scored; the partly filled current block is forced, never scored,
//!   so prefill and decoding select alike;
//! - score_j = Σ_{h in group g} softmax_j(s·q_{t,h}·k̄_j) over the scored windows (SSA/NSA), or
//!   Σ_{h in group g} s·q_{t,h}·k̄_j (MoBA's plain dot product, summed over the group), or
//!   InfLLM-V2's overlapping kernels: keys mean-pooled over 32 tokens at stride 16, the SSA score
//!   over the complete kernels, and a block scores the max over the complete kernels that
//!   overlap it; a candidate with no scored window scores −∞ (taken only to fill k);
//! - forced: the block holding p, the first `n_init` blocks, and the `n_local` blocks right
//!   before the current one; then the best-scoring candidates up to k blocks in all, ties to the
//!   lower index; output sorted ascending and padded with [`SENTINEL`].
//! - NOSA (`opts.evict` > 0, NOSA.md §2): the above keeps k − evict blocks; then a per-token
//!   eviction score e `[b, hkv, seq_k]` is pooled like the keys (mean over each window) and
//!   scored per block like them (the window's mean; InfLLM-V2: max over the complete windows
//!   overlapping the block), and the best-scoring remaining candidates fill the selection to k
//!   (ties to the lower index; −∞ for a candidate without a complete window).
//!   The query-aware blocks are kept whatever their eviction score (NOSA's +∞).

use crate::error::{Result, invalid};
use crate::problem::{
    AttnShape, SENTINEL, Scoring, SelectOptions, block_kernels, pooled_len, pooling,
};

/// Block of the token at absolute position `pos`, and the candidate range `0..end`.
pub fn current_and_end(opts: &SelectOptions, nb: usize, pos: usize) -> (usize, usize) {
    let cur = (pos / opts.block).min(nb - 1);
    (cur, if opts.causal { cur + 1 } else { nb })
}

/// Pooled windows token position `pos` may score: causal, those complete at `pos` (all their
/// keys at or before it); else all `np`.
pub fn scored_end(opts: &SelectOptions, np: usize, pos: usize) -> usize {
    if !opts.causal {
        return np;
    }
    let (w, st) = pooling(opts);
    if pos + 1 < w {
        0
    } else {
        ((pos + 1 - w) / st + 1).min(np)
    }
}

/// Is block `j` forced for a token whose current block is `cur`?
pub fn forced(opts: &SelectOptions, cur: usize, j: usize) -> bool {
    j == cur || j < opts.n_init || (j < cur && cur - j <= opts.n_local)
}

/// Mean-pooled keys `[b, hkv, np, d]`: blocks (SSA, MoBA) or InfLLM-V2's overlapping kernels.
pub fn block_keys(shape: &AttnShape, opts: &SelectOptions, k: &[f32]) -> Vec<f32> {
    let (d, sk) = (shape.head_dim, shape.seq_k);
    let (w, st) = pooling(opts);
    let np = pooled_len(opts, sk);
    let mut out = vec![0f32; shape.batch * shape.heads_kv * np * d];
    for bh in 0..shape.batch * shape.heads_kv {
        for p in 0..np {
            let (t0, t1) = (p * st, (p * st + w).min(sk));
            for c in 0..d {
                let s: f64 = (t0..t1).map(|t| k[(bh * sk + t) * d + c] as f64).sum();
                out[(bh * np + p) * d + c] = (s / (t1 - t0) as f64) as f32;
            }
        }
    }
    out
}

/// Mean-pooled per-token scores `[b, hkv, np]` (NOSA's eviction score, pooled like the keys).
pub fn pooled_scores(shape: &AttnShape, opts: &SelectOptions, e: &[f32]) -> Vec<f32> {
    let sk = shape.seq_k;
    let (w, st) = pooling(opts);
    let np = pooled_len(opts, sk);
    let mut out = vec![0f32; shape.batch * shape.heads_kv * np];
    for bh in 0..shape.batch * shape.heads_kv {
        for p in 0..np {
            let (t0, t1) = (p * st, (p * st + w).min(sk));
            let s: f64 = (t0..t1).map(|t| e[bh * sk + t] as f64).sum();
            out[bh * np + p] = (s / (t1 - t0) as f64) as f32;
        }
    }
    out
}

/// Block scores `0..end` from pooled scores `ps` of which the first `pend` are scored: the
/// block's window, or (InfLLM-V2) the max over the scored windows that overlap it; −∞ where
/// none is scored. Used for the query-aware scores and NOSA's eviction scores alike.
fn block_scores_from(
    opts: &SelectOptions,
    ps: &[f64],
    np: usize,
    pend: usize,
    end: usize,
) -> Vec<f64> {
    (0..end)
        .map(|j| match opts.scoring {
            Scoring::InfLlmV2 => {
                let (lo, hi) = block_kernels(opts, np, j);
                (lo..(hi + 1).min(pend))
                    .map(|m| ps[m])
                    .fold(f64::NEG_INFINITY, f64::max)
            }
            _ if j < pend => ps[j],
            _ => f64::NEG_INFINITY,
        })
        .collect()
}

/// Selection with its scores.
#[derive(Clone, Debug)]
pub struct Selection {
    /// `[b, hkv, seq_q, k]`, ascending, padded with SENTINEL.
    pub indices: Vec<u32>,
    /// `[b, hkv, seq_q, nb]`: score of every block (NaN for blocks that are not candidates,
    /// −∞ for candidates without a scored window).
    pub scores: Vec<f64>,
    /// `[b, hkv, seq_q, np]`: score of every pooled key (NaN for those not scored); the same as
    /// `scores` except for InfLLM-V2.
    pub pooled: Vec<f64>,
    /// NOSA: `[b, hkv, seq_q, nb]` eviction score of every block (NaN for non-candidates, −∞
    /// for candidates without a complete window); empty without eviction.
    pub evict_scores: Vec<f64>,
}

pub fn select(shape: &AttnShape, opts: &SelectOptions, q: &[f32], k: &[f32]) -> Result<Selection> {
    select_nosa(shape, opts, q, k, None)
}

/// [`select`] with NOSA's eviction score `[b, hkv, seq_k]`, needed exactly when `opts.evict` > 0.
pub fn select_nosa(
    shape: &AttnShape,
    opts: &SelectOptions,
    q: &[f32],
    k: &[f32],
    evict: Option<&[f32]>,
) -> Result<Selection> {
    opts.validate(shape)?;
    let n_e = shape.batch * shape.heads_kv * shape.seq_k;
    match (opts.evict > 0, evict) {
        (true, None) => invalid!(
            "the selection keeps {} blocks by an eviction score; none was given",
            opts.evict
        ),
        (false, Some(_)) => invalid!("an eviction score was given to a selection with evict = 0"),
        (true, Some(e)) if e.len() != n_e => invalid!(
            "the eviction score has {} elements; the shape {shape:?} needs {n_e}",
            e.len()
        ),
        _ => {}
    }
    if q.len() != shape.q_len() || k.len() != shape.kv_len() {
        invalid!(
            "q has {} and k {} elements; the shape {shape:?} needs {} and {}",
            q.len(),
            k.len(),
            shape.q_len(),
            shape.kv_len()
        );
    }
    let (d, sq, g) = (shape.head_dim, shape.seq_q, shape.group());
    let nb = opts.blocks(shape.seq_k);
    let np = pooled_len(opts, shape.seq_k);
    let scale = opts.scale.unwrap_or(1.0 / (d as f32).sqrt()) as f64;
    let kbar = block_keys(shape, opts, k);
    let ebar = evict.map(|e| pooled_scores(shape, opts, e));
    let rows = shape.batch * shape.heads_kv * sq;
    let mut evict_scores = vec![f64::NAN; if evict.is_some() { rows * nb } else { 0 }];
    let mut indices = vec![SENTINEL; rows * opts.k];
    let mut scores = vec![f64::NAN; rows * nb];
    let mut pooled = vec![f64::NAN; rows * np];
    for bkv in 0..shape.batch * shape.heads_kv {
        for t in 0..sq {
            let row = bkv * sq + t;
            let pos = shape.q_offset() + t;
            let (cur, end) = current_and_end(opts, nb, pos);
            let pend = scored_end(opts, np, pos);
            let ps = &mut pooled[row * np..row * np + pend];
            ps.fill(0.0);
            for h in 0..g {
                let qrow = (bkv * g + h) * sq + t;
                let qv = &q[qrow * d..(qrow + 1) * d];
                let logits: Vec<f64> = (0..pend)
                    .map(|p| {
                        let kb = &kbar[(bkv * np + p) * d..(bkv * np + p + 1) * d];
                        scale
                            * qv.iter()
                                .zip(kb)
                                .map(|(&a, &b)| a as f64 * b as f64)
                                .sum::<f64>()
                    })
                    .collect();
                match opts.scoring {
                    Scoring::Moba => ps.iter_mut().zip(&logits).for_each(|(s, l)| *s += l),
                    Scoring::Ssa | Scoring::InfLlmV2 => {
                        let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                        let z: f64 = logits.iter().map(|l| (l - m).exp()).sum();
                        ps.iter_mut()
                            .zip(&logits)
                            .for_each(|(s, l)| *s += (l - m).exp() / z);
                    }
                }
            }
            let score = &mut scores[row * nb..row * nb + end];
            score.copy_from_slice(&block_scores_from(opts, ps, np, pend, end));
            // Forced blocks first (by index), then by score (ties to the lower index).
            let mut order: Vec<usize> = (0..end).collect();
            order.sort_by(|&a, &b| {
                let (fa, fb) = (forced(opts, cur, a), forced(opts, cur, b));
                fb.cmp(&fa)
                    .then(score[b].total_cmp(&score[a]))
                    .then(a.cmp(&b))
            });
            let mut chosen: Vec<u32> = order
                .iter()
                .take(opts.query_k())
                .map(|&j| j as u32)
                .collect();
            if let Some(ebar) = &ebar {
                // NOSA: the rest of the budget by the pooled eviction score (query-agnostic).
                let pe: Vec<f64> = ebar[bkv * np..(bkv + 1) * np]
                    .iter()
                    .map(|&x| x as f64)
                    .collect();
                let es = block_scores_from(opts, &pe, np, pend, end);
                evict_scores[row * nb..row * nb + end].copy_from_slice(&es);
                let mut rest: Vec<usize> = (0..end)
                    .filter(|j| !chosen.contains(&(*j as u32)))
                    .collect();
                rest.sort_by(|&a, &b| es[b].total_cmp(&es[a]).then(a.cmp(&b)));
                chosen.extend(rest.iter().take(opts.k - chosen.len()).map(|&j| j as u32));
            }
            chosen.sort_unstable();
            indices[row * opts.k..row * opts.k + chosen.len()].copy_from_slice(&chosen);
        }
    }
    Ok(Selection {
        indices,
        scores,
        pooled,
        evict_scores,
    })
}

/// Decoding locality of a selection `[units, seq, k]` (SENTINEL-padded): the share of the blocks
/// selected for token t that were selected for token t − 1 too, over t ≥ 1 of every unit
/// (sequence × kv head), counted per block (NOSA.md §5: the cache hit rate of an offloaded KV
/// cache that keeps the previous step's blocks). `None` when no token past the first selects
/// anything.
pub fn hit_rate(sel: &[u32], seq: usize, k: usize) -> Option<f64> {
    let (mut hits, mut total) = (0u64, 0u64);
    let rows = sel.len() / k.max(1);
    for r in 0..rows {
        if r % seq == 0 {
            continue;
        }
        let (prev, cur) = (&sel[(r - 1) * k..r * k], &sel[r * k..(r + 1) * k]);
        for &j in cur.iter().filter(|&&j| j != SENTINEL) {
            total += 1;
            // Rows are ascending: a binary search finds the block.
            hits += prev.binary_search(&j).is_ok() as u64;
        }
    }
    (total > 0).then(|| hits as f64 / total as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hit_rate_counts_blocks_kept_from_the_previous_token() {
        let s = SENTINEL;
        // One unit of 3 tokens, k = 3: token 1 keeps 2 of its 3 blocks, token 2 keeps 1 of 2.
        let sel = [0, 1, s, 0, 1, 2, 2, 5, s];
        assert_eq!(hit_rate(&sel, 3, 3), Some(3.0 / 5.0));
        // Two units: the first token of the second unit is not compared with the first unit.
        let two = [0, s, 0, s, 7, s, 7, s];
        assert_eq!(hit_rate(&two, 2, 2), Some(1.0));
        assert_eq!(hit_rate(&[s, s], 1, 2), None);
    }
}
