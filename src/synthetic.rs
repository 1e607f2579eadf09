//! Synthetic inputs with structure worth looking at (the browser demo, `explore` and `map` use
//! them when no real activations are given).

/// Demo inputs with structure worth looking at: a smooth positional component shared by queries
/// and keys (attention to nearby tokens) plus a few "needle" keys every query is drawn to.
/// Returns (q, k) for `[b, hq, sq, d]` and `[b, hkv, sk, d]`.
pub fn structured_qk(shape: &crate::AttnShape, seed: u64) -> (Vec<f32>, Vec<f32>) {
    structured_qk_with(shape, seed, 6, 2.5)
}

/// [`structured_qk`] with the structure adjustable: `needles` keys every query is drawn to, and
/// `locality`, the weight of the shared positional component (0 = none; 2.5 is the default).
pub fn structured_qk_with(
    shape: &crate::AttnShape,
    seed: u64,
    needles: usize,
    locality: f32,
) -> (Vec<f32>, Vec<f32>) {
    let mut rng = crate::reference::Rng::new(seed);
    let d = shape.head_dim;
    let mut q = rng.normal_vec(shape.q_len(), 1.0);
    let mut k = rng.normal_vec(shape.kv_len(), 1.0);
    // A shared direction queries carry and needle keys amplify.
    let c: Vec<f32> = rng.normal_vec(d, 1.0);
    let needles: Vec<usize> = (0..needles)
        .map(|_| (rng.next_u64() % shape.seq_k as u64) as usize)
        .collect();
    let pos = |p: usize, c: usize| -> f32 {
        // Slow sinusoids over the first dims: nearby positions look alike.
        let f = (c / 2 + 1) as f32 * 0.02;
        if c.is_multiple_of(2) {
            (p as f32 * f).sin()
        } else {
            (p as f32 * f).cos()
        }
    };
    let band = d.min(16);
    for (row, x) in q.chunks_mut(d).enumerate() {
        let t = shape.q_offset() + row % shape.seq_q;
        for (c, xc) in x.iter_mut().take(band).enumerate() {
            *xc += locality * pos(t, c);
        }
        for (xc, cc) in x.iter_mut().zip(&c) {
            *xc += 0.4 * cc;
        }
    }
    for (row, x) in k.chunks_mut(d).enumerate() {
        let j = row % shape.seq_k;
        for (c, xc) in x.iter_mut().take(band).enumerate() {
            *xc += locality * pos(j, c);
        }
        if needles.contains(&j) {
            for (xc, cc) in x.iter_mut().zip(&c) {
                *xc += 2.0 * cc;
            }
        }
    }
    (q, k)
}
