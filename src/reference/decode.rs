//! Decoding in plain Rust: the ground truth for `shaders/decode.wgsl`.
//!
//! A decoding step is the last `n_q` query rows of prefill attention over each sequence's
//! cached keys, so the reference is exactly that: per sequence `b`, the prefill problem of
//! `len[b]` keys (`DecodeShape::prefill`) through `reference::attention` (full) or
//! `reference::sparse` (over a selection), causal, with the optional per-key bias.

use crate::error::{Result, invalid};
use crate::problem::{AttnOptions, DecodeKeys, DecodeShape, SparseOptions};
use crate::reference::attention::{Forward, forward_biased};

/// The inputs of one step, as host slices: q `[b, hq, n_q, d]`, the caches
/// `[b, hkv, capacity, d]`, the lengths `[b]`, the selection `[b, hkv, n_q, nsel]` for
/// [`DecodeKeys::Sparse`] and the bias `[b, hkv, capacity]` when there is one.
#[derive(Clone, Copy, Debug)]
pub struct DecodeData<'a> {
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub lens: &'a [u32],
    pub sel: Option<&'a [u32]>,
    pub bias: Option<&'a [f32]>,
}

/// O `[b, hq, n_q, d]` and LSE `[b, hq, n_q]` of one decoding step.
pub fn forward(
    shape: &DecodeShape,
    keys: &DecodeKeys,
    scale: Option<f32>,
    x: &DecodeData,
) -> Result<Forward> {
    shape.validate(keys, scale)?;
    shape.check_lens(x.lens)?;
    let (b, hq, hkv, nq, cap, d) = (
        shape.batch,
        shape.heads_q,
        shape.heads_kv,
        shape.n_q,
        shape.capacity,
        shape.head_dim,
    );
    let nsel = match *keys {
        DecodeKeys::Sparse { nsel, .. } => nsel,
        DecodeKeys::Full => 0,
    };
    for (name, got, want) in [
        ("q", x.q.len(), b * hq * nq * d),
        ("k", x.k.len(), b * hkv * cap * d),
        ("v", x.v.len(), b * hkv * cap * d),
        (
            "selection",
            x.sel.map_or(0, |s| s.len()),
            b * hkv * nq * nsel,
        ),
        (
            "bias",
            x.bias.map_or(0, |s| s.len()),
            x.bias.map_or(0, |_| b * hkv * cap),
        ),
    ] {
        if got != want {
            invalid!("{name} has {got} elements; the decoding shape {shape:?} needs {want}");
        }
    }
    let mut out = Forward {
        o: Vec::with_capacity(b * hq * nq * d),
        lse: Vec::with_capacity(b * hq * nq),
    };
    for (s, &len) in x.lens.iter().enumerate() {
        let len = len as usize;
        let pre = shape.prefill(len);
        // The first `len` rows of every kv head of sequence s.
        let rows = |t: &[f32], width: usize| -> Vec<f32> {
            (0..hkv)
                .flat_map(|h| {
                    let at = (s * hkv + h) * cap * width;
                    t[at..at + len * width].iter().copied()
                })
                .collect()
        };
        let q = &x.q[s * hq * nq * d..(s + 1) * hq * nq * d];
        let (k, v) = (rows(x.k, d), rows(x.v, d));
        let bias = x.bias.map(|t| rows(t, 1));
        let f = match *keys {
            DecodeKeys::Full => forward_biased(
                &pre,
                &AttnOptions {
                    causal: true,
                    scale,
                },
                q,
                &k,
                &v,
                bias.as_deref(),
            )?,
            DecodeKeys::Sparse { block, nsel } => {
                let sel = x.sel.expect("checked above");
                crate::reference::sparse::forward(
                    &pre,
                    &SparseOptions {
                        block,
                        causal: true,
                        scale,
                    },
                    q,
                    &k,
                    &v,
                    &sel[s * hkv * nq * nsel..(s + 1) * hkv * nq * nsel],
                    nsel,
                    bias.as_deref(),
                )?
            }
        };
        out.o.extend(f.o);
        out.lse.extend(f.lse);
    }
    Ok(out)
}
