//! Decoding attention on the GPU against the f64 reference (the last rows of prefill attention
//! over each sequence's cached keys) and against the GPU's own prefill kernels, row for row.
//! Cache rows past each sequence's length hold NaN: a kernel that reads them fails.

use crate::common;

use sparse_attn::gpu::{DType, Gpu, round_f16};
use sparse_attn::problem::{SENTINEL, SelectOptions};
use sparse_attn::reference::decode::{self as refdec, DecodeData};
use sparse_attn::reference::{Rng, compare};
use sparse_attn::{
    AttnOptions, AttnOutput, AttnShape, BlockSelect, DecodeAttention, DecodeConfig, DecodeInputs,
    DecodeKeys, DecodeShape, FullAttention, FullConfig, Qkv, SelectConfig, SelectInputs,
    SparseAttention, SparseConfig, SparseInputs,
};

/// Relative L2 error allowed in f32 (observed ~1e-7) and with f16 storage (inputs rounded
/// before the reference sees them, outputs rounded: ~3e-4).
const TOL: f64 = 2e-5;
const TOL_F16: f64 = 2e-3;

struct Case {
    shape: DecodeShape,
    lens: Vec<u32>,
    keys: DecodeKeys,
    bias: bool,
    split: Option<usize>,
}

fn dshape(b: usize, hq: usize, hkv: usize, nq: usize, cap: usize, d: usize) -> DecodeShape {
    DecodeShape {
        batch: b,
        heads_q: hq,
        heads_kv: hkv,
        n_q: nq,
        capacity: cap,
        head_dim: d,
    }
}

/// N(0, 1) rows for the first `lens[b]` tokens of each cache, NaN after them.
fn cache(rng: &mut Rng, s: &DecodeShape, lens: &[u32], width: usize, std: f64) -> Vec<f32> {
    let mut out = Vec::with_capacity(s.batch * s.heads_kv * s.capacity * width);
    for &len in lens {
        for _ in 0..s.heads_kv {
            for t in 0..s.capacity {
                for x in rng.normal_vec(width, std) {
                    out.push(if t < len as usize { x } else { f32::NAN });
                }
            }
        }
    }
    out
}

/// Random selections over each sequence's blocks: ascending, SENTINEL-padded, always holding
/// the query's own block (as real selections do), sometimes blocks past the length.
fn selection(rng: &mut Rng, s: &DecodeShape, lens: &[u32], block: usize, nsel: usize) -> Vec<u32> {
    let mut out = vec![];
    for &len in lens {
        let nb = (len as usize).div_ceil(block);
        for _ in 0..s.heads_kv {
            for i in 0..s.n_q {
                let own = ((len as usize - s.n_q + i) / block) as u32;
                let mut row: Vec<u32> = vec![own];
                for _ in 1..nsel {
                    let b = (rng.next_u64() % (nb as u64 + 2)) as u32;
                    row.push(if b as usize > nb { SENTINEL } else { b });
                }
                row.sort_unstable();
                row.dedup();
                row.resize(nsel, SENTINEL);
                out.extend(row);
            }
        }
    }
    out
}

fn poisoned(gpu: &Gpu, s: &DecodeShape, dt: DType) -> AttnOutput {
    let n = s.q_dims().iter().product::<usize>();
    AttnOutput {
        o: gpu.upload_as(&s.q_dims(), &vec![f32::NAN; n], dt).unwrap(),
        lse: gpu
            .upload(&s.lse_dims(), &vec![f32::NAN; s.batch * s.heads_q * s.n_q])
            .unwrap(),
    }
}

fn run_case(gpu: &Gpu, rng: &mut Rng, c: &Case, dt: DType) {
    let s = c.shape;
    let ctx = format!(
        "{s:?} lens {:?} {:?} bias {} split {:?} {dt:?}",
        c.lens, c.keys, c.bias, c.split
    );
    let round = |x: Vec<f32>| if dt == DType::F16 { round_f16(&x) } else { x };
    let q = round(rng.normal_vec(s.q_dims().iter().product(), 1.0));
    let k = round(cache(rng, &s, &c.lens, s.head_dim, 1.0));
    let v = round(cache(rng, &s, &c.lens, s.head_dim, 1.0));
    let bias = c.bias.then(|| cache(rng, &s, &c.lens, 1, 2.0));
    let sel = match c.keys {
        DecodeKeys::Sparse { block, nsel } => Some(selection(rng, &s, &c.lens, block, nsel)),
        DecodeKeys::Full => None,
    };
    let op = DecodeAttention::new(
        gpu,
        s,
        &DecodeConfig::new(c.keys)
            .bias(c.bias)
            .dtype(dt)
            .split_keys(c.split),
    )
    .expect(&ctx);
    let up = |dims: &[usize], x: &[f32]| gpu.upload_as(dims, x, dt).unwrap();
    let (tq, tk, tv) = (
        up(&s.q_dims(), &q),
        up(&s.cache_dims(), &k),
        up(&s.cache_dims(), &v),
    );
    let tl = gpu.upload_u32(&[s.batch], &c.lens).unwrap();
    let ts = match (&sel, c.keys) {
        (Some(x), DecodeKeys::Sparse { nsel, .. }) => {
            Some(gpu.upload_u32(&s.sel_dims(nsel), x).unwrap())
        }
        _ => None,
    };
    let tb = bias
        .as_ref()
        .map(|b| gpu.upload(&s.bias_dims(), b).unwrap());
    let out = poisoned(gpu, &s, dt);
    let mut enc = gpu.encoder();
    let x = DecodeInputs::new(&tq, &tk, &tv, &tl)
        .sel(ts.as_ref())
        .bias(tb.as_ref());
    op.encode(gpu, &mut enc, &x, &out).expect(&ctx);
    gpu.queue().submit([enc.finish()]);
    let want = refdec::forward(
        &s,
        &c.keys,
        None,
        &DecodeData {
            q: &q,
            k: &k,
            v: &v,
            lens: &c.lens,
            sel: sel.as_deref(),
            bias: bias.as_deref(),
        },
    )
    .expect(&ctx);
    let tol = if dt == DType::F16 { TOL_F16 } else { TOL };
    let got_lse = gpu.read(&out.lse).unwrap();
    let e = compare(&got_lse, &want.lse);
    assert!(e.within(tol), "LSE {e:?} ({ctx})");
    let e = compare(&gpu.read(&out.o).unwrap(), &want.o);
    assert!(e.within(tol), "O {e:?} ({ctx})");
}

fn cases() -> Vec<Case> {
    let full = DecodeKeys::Full;
    let sp = |block, nsel| DecodeKeys::Sparse { block, nsel };
    let c = |shape, lens: &[u32], keys, bias, split| Case {
        shape,
        lens: lens.to_vec(),
        keys,
        bias,
        split,
    };
    vec![
        // One token, one key.
        c(dshape(1, 1, 1, 1, 1, 16), &[1], full, false, None),
        // Sequences of different lengths, GQA 4, lengths not multiples of the tile.
        c(
            dshape(3, 8, 2, 1, 300, 64),
            &[300, 1, 129],
            full,
            false,
            None,
        ),
        // Several new tokens, split into many ranges (64 keys each) and into one.
        c(
            dshape(2, 4, 4, 3, 200, 32),
            &[200, 70],
            full,
            true,
            Some(64),
        ),
        c(
            dshape(2, 4, 4, 3, 200, 32),
            &[200, 70],
            full,
            false,
            Some(256),
        ),
        // Head dims 128 and 256, GQA 8.
        c(dshape(1, 8, 1, 1, 520, 128), &[517], full, true, None),
        c(
            dshape(2, 2, 1, 2, 90, 256),
            &[90, 33],
            full,
            false,
            Some(64),
        ),
        // 11 query heads per kv head (no divisor up to 8 but 1: more P V items than threads,
        // each thread takes several) and ranges of 50 keys (not a multiple of anything).
        c(dshape(1, 11, 1, 2, 150, 64), &[150], full, true, Some(50)),
        // Selections: blocks 16 to 128, partly filled current blocks, SENTINEL padding.
        c(
            dshape(2, 6, 2, 1, 400, 64),
            &[400, 77],
            sp(16, 6),
            false,
            None,
        ),
        c(
            dshape(2, 6, 3, 2, 300, 32),
            &[299, 130],
            sp(32, 4),
            true,
            Some(64),
        ),
        c(
            dshape(1, 4, 1, 1, 1000, 128),
            &[1000],
            sp(64, 8),
            true,
            None,
        ),
        c(
            dshape(2, 2, 2, 4, 700, 64),
            &[700, 260],
            sp(128, 3),
            false,
            Some(128),
        ),
    ]
}

#[test]
fn decoding_matches_reference() {
    let Some(gpu) = common::gpu() else { return };
    let seed = Rng::fresh_seed();
    eprintln!("seed {seed}");
    let mut rng = Rng::new(seed);
    for c in cases() {
        run_case(&gpu, &mut rng, &c, DType::F32);
    }
}

/// f16 storage (native where the device has SHADER_F16, packed in u32 words elsewhere).
#[test]
fn decoding_f16_matches_reference() {
    let Some(gpu) = common::gpu() else { return };
    let seed = Rng::fresh_seed();
    eprintln!("seed {seed}");
    let mut rng = Rng::new(seed);
    for c in cases() {
        run_case(&gpu, &mut rng, &c, DType::F16);
    }
}

/// Decoding token t is row t of prefill attention, on the GPU both: full attention, and sparse
/// attention over the prefill's own selection (SSA's blocks and NOSA's with an eviction score
/// and the bias), f32 and f16. The cache is the prefill's k and v; the decoder sees only the
/// first t + 1 of them (its length), the rest being NaN.
#[test]
fn decoding_token_t_is_row_t_of_prefill() {
    let Some(gpu) = common::gpu() else { return };
    let seed = Rng::fresh_seed();
    eprintln!("seed {seed}");
    let mut rng = Rng::new(seed);
    let (hq, hkv, d, seq) = (4, 2, 64, 333);
    let shape = AttnShape::new(1, hq, hkv, seq, d);
    let nosa = SelectOptions::nosa_budget(16, 8, 1, 2, 2).unwrap();
    let ssa = SelectOptions {
        k: 6,
        ..SelectOptions::ssa()
    };
    for dt in [DType::F32, DType::F16] {
        let round = |x: Vec<f32>| if dt == DType::F16 { round_f16(&x) } else { x };
        let q = round(rng.normal_vec(shape.q_len(), 1.0));
        let k = round(rng.normal_vec(shape.kv_len(), 1.0));
        let v = round(rng.normal_vec(shape.kv_len(), 1.0));
        let bias = rng.normal_vec(hkv * seq, 1.0);
        let up = |dims: &[usize], x: &[f32]| gpu.upload_as(dims, x, dt).unwrap();
        let (tq, tk, tv) = (
            up(&shape.q_dims(), &q),
            up(&shape.kv_dims(), &k),
            up(&shape.kv_dims(), &v),
        );
        let tb = gpu.upload(&[1, hkv, seq], &bias).unwrap();
        // Prefill: full (biased) and the two selections with their sparse attention.
        let fa = FullAttention::new(
            &gpu,
            shape,
            &FullConfig::new(AttnOptions::causal(true))
                .bias(true)
                .dtype(dt),
        )
        .unwrap();
        let full = AttnOutput::empty_as(&gpu, &shape, dt).unwrap();
        let mut enc = gpu.encoder();
        fa.encode_forward(
            &gpu,
            &mut enc,
            Qkv::new(&tq, &tk, &tv).bias(Some(&tb)),
            &full,
        )
        .unwrap();
        gpu.queue().submit([enc.finish()]);
        let mut runs = vec![(DecodeKeys::Full, None, full, true)];
        for (opts, evict) in [(ssa, false), (nosa, true)] {
            let sel_op = BlockSelect::new(&gpu, shape, &SelectConfig::new(opts).dtype(dt)).unwrap();
            let ev = gpu.upload(&[1, hkv, seq], &bias).unwrap();
            let (sel, _) = sel_op
                .select_inputs(
                    &gpu,
                    &SelectInputs::new(&tq, &tk).evict(evict.then_some(&ev)),
                )
                .unwrap();
            let sp = SparseAttention::new(
                &gpu,
                shape,
                &SparseConfig::for_selection(&opts).bias(evict).dtype(dt),
            )
            .unwrap();
            let out = sp
                .forward(
                    &gpu,
                    &SparseInputs::new(&tq, &tk, &tv, &sel).bias(evict.then_some(&tb)),
                )
                .unwrap();
            let keys = DecodeKeys::Sparse {
                block: opts.block,
                nsel: opts.k,
            };
            runs.push((keys, Some(gpu.read_u32(&sel).unwrap()), out, evict));
        }
        for (keys, sel, prefill, biased) in runs {
            let (po, pl) = (
                gpu.read(&prefill.o).unwrap(),
                gpu.read(&prefill.lse).unwrap(),
            );
            let s = DecodeShape {
                batch: 1,
                heads_q: hq,
                heads_kv: hkv,
                n_q: 1,
                capacity: seq,
                head_dim: d,
            };
            let op = DecodeAttention::new(&gpu, s, &DecodeConfig::new(keys).bias(biased).dtype(dt))
                .unwrap();
            for t in [0, 15, 16, 100, 200, seq - 1] {
                let ctx = format!("{keys:?} {dt:?} token {t}");
                let len = t + 1;
                let masked = |x: &[f32], w: usize| -> Vec<f32> {
                    (0..hkv)
                        .flat_map(|h| {
                            (0..seq * w).map(move |j| (h, j)).map(|(h, j)| {
                                if j / w < len {
                                    x[h * seq * w + j]
                                } else {
                                    f32::NAN
                                }
                            })
                        })
                        .collect()
                };
                let row = |x: &[f32], w: usize| -> Vec<f32> {
                    (0..hq)
                        .flat_map(|h| x[(h * seq + t) * w..(h * seq + t + 1) * w].to_vec())
                        .collect()
                };
                let tq1 = up(&s.q_dims(), &row(&q, d));
                let (tk1, tv1) = (
                    up(&s.cache_dims(), &masked(&k, d)),
                    up(&s.cache_dims(), &masked(&v, d)),
                );
                let tb1 = gpu.upload(&s.bias_dims(), &masked(&bias, 1)).unwrap();
                let tl = gpu.upload_u32(&[1], &[len as u32]).unwrap();
                let ts = sel.as_ref().map(|x| {
                    let nsel = x.len() / (hkv * seq);
                    let r: Vec<u32> = (0..hkv)
                        .flat_map(|h| x[(h * seq + t) * nsel..(h * seq + t + 1) * nsel].to_vec())
                        .collect();
                    gpu.upload_u32(&s.sel_dims(nsel), &r).unwrap()
                });
                let out = poisoned(&gpu, &s, dt);
                let mut enc = gpu.encoder();
                let x = DecodeInputs::new(&tq1, &tk1, &tv1, &tl)
                    .sel(ts.as_ref())
                    .bias(biased.then_some(&tb1));
                op.encode(&gpu, &mut enc, &x, &out).expect(&ctx);
                gpu.queue().submit([enc.finish()]);
                let tol = if dt == DType::F16 { TOL_F16 } else { TOL };
                let e = compare(&gpu.read(&out.o).unwrap(), &row(&po, d));
                assert!(e.within(tol), "O {e:?} ({ctx})");
                let e = compare(&gpu.read(&out.lse).unwrap(), &row(&pl, 1));
                assert!(e.within(tol), "LSE {e:?} ({ctx})");
            }
        }
    }
}

/// Lengths and selections live on the GPU, where the host cannot check them: a length past the
/// capacity reads as the capacity, one below n_q leaves the first queries without keys
/// (O = 0, LSE = -inf), and block indices past the length select nothing. No NaN, no fault.
#[test]
fn out_of_range_lengths_and_blocks_are_clamped() {
    let Some(gpu) = common::gpu() else { return };
    let mut rng = Rng::new(7);
    let s = dshape(2, 2, 1, 3, 100, 32);
    let n = s.q_dims().iter().product();
    let q = rng.normal_vec(n, 1.0);
    let kv = rng.normal_vec(2 * 100 * 32, 1.0);
    let (tq, tk) = (
        gpu.upload(&s.q_dims(), &q).unwrap(),
        gpu.upload(&s.cache_dims(), &kv).unwrap(),
    );
    let op = DecodeAttention::new(&gpu, s, &DecodeConfig::new(DecodeKeys::Full)).unwrap();
    let run = |lens: &[u32]| {
        let tl = gpu.upload_u32(&[2], lens).unwrap();
        let out = op
            .forward(&gpu, &DecodeInputs::new(&tq, &tk, &tk, &tl))
            .unwrap();
        (gpu.read(&out.o).unwrap(), gpu.read(&out.lse).unwrap())
    };
    let (o_big, l_big) = run(&[u32::MAX, 1]);
    let (o_cap, l_cap) = run(&[100, 1]);
    assert_eq!(o_big, o_cap);
    assert_eq!(l_big, l_cap);
    // Sequence 1 has 1 token for 3 queries: queries 0 and 1 see nothing, query 2 sees key 0.
    for h in 0..2 {
        let r = (2 + h) * 3;
        assert_eq!(l_cap[r], f32::NEG_INFINITY);
        assert_eq!(l_cap[r + 1], f32::NEG_INFINITY);
        assert!(l_cap[r + 2].is_finite());
        assert!(o_cap[r * 32..(r + 2) * 32].iter().all(|&x| x == 0.0));
    }
    // Block indices past the length (and huge ones whose start would wrap) select nothing.
    let sp = DecodeKeys::Sparse { block: 16, nsel: 3 };
    let op = DecodeAttention::new(&gpu, s, &DecodeConfig::new(sp)).unwrap();
    let tl = gpu.upload_u32(&[2], &[100, 50]).unwrap();
    let mut sel = vec![];
    for b in 0..2 {
        for _ in 0..3 {
            let own = if b == 0 { 6 } else { 3 };
            sel.extend([own, 7, 0x1000_0001]);
        }
    }
    let ts = gpu.upload_u32(&s.sel_dims(3), &sel).unwrap();
    let out = op
        .forward(&gpu, &DecodeInputs::new(&tq, &tk, &tk, &tl).sel(Some(&ts)))
        .unwrap();
    let got = gpu.read(&out.o).unwrap();
    assert!(got.iter().all(|x| x.is_finite()));
    let only_own: Vec<u32> = sel
        .iter()
        .map(|&b| if b >= 7 { SENTINEL } else { b })
        .collect();
    let want = refdec::forward(
        &s,
        &sp,
        None,
        &DecodeData {
            q: &q,
            k: &kv,
            v: &kv,
            lens: &[100, 50],
            sel: Some(&only_own),
            bias: None,
        },
    )
    .unwrap();
    // Sequence 0 (100 tokens) has 7 blocks: block 7 is past it too.
    let e = compare(&got, &want.o);
    assert!(e.within(TOL), "{e:?}");
}

/// The first `len` rows of each kv head of sequence `b` of a `[batch, heads, cap, width]` tensor.
fn prefix(x: &[f32], b: usize, heads: usize, cap: usize, width: usize, len: usize) -> Vec<f32> {
    (0..heads)
        .flat_map(|h| {
            let at = (b * heads + h) * cap * width;
            x[at..at + len * width].to_vec()
        })
        .collect()
}

/// Selection while decoding, from pooled keys (and NOSA's pooled eviction scores) kept across
/// steps and pooled only as windows complete, equals the prefill selection of the same tokens,
/// bit for bit: sequences of different lengths, prompts then steps of 1, 3 and 5 tokens (the
/// row kernels, split and not, and the tiled product), every scoring, NOSA's two stages.
/// On the default device (row_logits split over subgroup lanes where it has subgroups) and on a
/// portable one (a thread per pooled key, the browser's form).
#[test]
fn decoding_selection_from_pooled_state_equals_prefill() {
    let Some(gpu) = common::gpu() else { return };
    selection_from_pooled_state(&gpu, None);
    let portable = common::gpu_with(&sparse_attn::GpuOptions {
        portable_only: true,
        ..Default::default()
    })
    .unwrap();
    selection_from_pooled_state(&portable, Some(false));
}

/// `subgroups`: the row_logits form the device must take (None: whichever it takes).
fn selection_from_pooled_state(gpu: &Gpu, subgroups: Option<bool>) {
    let seed = Rng::fresh_seed();
    eprintln!("seed {seed}");
    let mut rng = Rng::new(seed);
    let (hq, hkv, d, cap) = (4, 2, 32, 260);
    let ssa = SelectOptions {
        k: 6,
        ..SelectOptions::ssa()
    };
    let options = [
        ssa,
        SelectOptions {
            scoring: sparse_attn::Scoring::Moba,
            ..ssa
        },
        SelectOptions {
            scoring: sparse_attn::Scoring::InfLlmV2,
            n_init: 1,
            n_local: 1,
            ..ssa
        },
        SelectOptions::nosa_budget(16, 8, 1, 2, 2).unwrap(),
    ];
    for opts in options {
        let nosa = opts.evict > 0;
        let prompts = [130u32, 177];
        let b = prompts.len();
        // Every token's q, k and eviction score, drawn up front (decoding reveals them in turn).
        let q_all = rng.normal_vec(b * hq * cap * d, 1.0);
        let k_all = rng.normal_vec(b * hkv * cap * d, 1.0);
        let e_all = rng.normal_vec(b * hkv * cap, 1.0);
        let tk = gpu.upload(&[b, hkv, cap, d], &k_all).unwrap();
        let te = gpu.upload(&[b, hkv, cap], &e_all).unwrap();
        let mut lens = prompts.to_vec();
        // 1 and 3 tokens (2 and 6 rows per kv head) run the row kernels, 3 with the pooled
        // keys split in odd pieces; 5 tokens (10 rows) the tiled product.
        for (n_q, split) in [(1usize, None), (3, Some(5)), (5, None)] {
            let shape = AttnShape {
                batch: b,
                heads_q: hq,
                heads_kv: hkv,
                seq_q: n_q,
                seq_k: cap,
                head_dim: d,
            };
            let cfg = SelectConfig::new(opts).decoding(true).score_split(split);
            let op = BlockSelect::new(gpu, shape, &cfg).unwrap();
            assert_eq!(op.logit_dims().is_some(), n_q < 5);
            eprintln!(
                "{n_q} tokens: row_logits on subgroups: {}",
                op.row_subgroups()
            );
            if let Some(sg) = subgroups {
                assert_eq!(op.row_subgroups(), sg && n_q < 5);
            }
            if split.is_some() {
                assert!(op.score_split().0 > 1, "{:?}", op.score_split());
            }
            // The pooled state carries over between ops of the same cache (same capacity).
            let state = op.scratch(gpu).unwrap();
            // Prompt: pool everything so far (n_new = the longest prompt: each sequence pools
            // from its start); then every step pools the windows its n_q new tokens complete.
            let mut first = true;
            let longest = *prompts.iter().max().unwrap() as usize;
            for _step in 0..24.min((cap - longest) / n_q) {
                let n_new = if first {
                    *lens.iter().max().unwrap() as usize
                } else {
                    n_q
                };
                if !first {
                    for l in lens.iter_mut() {
                        *l += n_q as u32;
                    }
                }
                first = false;
                let tl = gpu.upload_u32(&[b], &lens).unwrap();
                // q of the newest n_q tokens of each sequence.
                let q: Vec<f32> = (0..b)
                    .flat_map(|s| {
                        let len = lens[s] as usize;
                        let q_all = &q_all;
                        (0..hq).flat_map(move |h| {
                            let at = ((s * hq + h) * cap + len - n_q) * d;
                            q_all[at..at + n_q * d].to_vec()
                        })
                    })
                    .collect();
                let tq = gpu.upload(&shape.q_dims(), &q).unwrap();
                let out = gpu
                    .upload_u32(&[b, hkv, n_q, opts.k], &vec![12345; b * hkv * n_q * opts.k])
                    .unwrap();
                let mut enc = gpu.encoder();
                op.encode_pool(gpu, &mut enc, &tk, nosa.then_some(&te), &tl, n_new, &state)
                    .unwrap();
                op.encode_pooled(gpu, &mut enc, &tq, &tl, &state, &out)
                    .unwrap();
                gpu.queue().submit([enc.finish()]);
                let got = gpu.read_u32(&out).unwrap();
                for (s, &len) in lens.iter().enumerate() {
                    let len = len as usize;
                    let pre = AttnShape::new(1, hq, hkv, len, d);
                    let pq = gpu
                        .upload(&pre.q_dims(), &prefix(&q_all, s, hq, cap, d, len))
                        .unwrap();
                    let pk = gpu
                        .upload(&pre.kv_dims(), &prefix(&k_all, s, hkv, cap, d, len))
                        .unwrap();
                    let pe = gpu
                        .upload(&[1, hkv, len], &prefix(&e_all, s, hkv, cap, 1, len))
                        .unwrap();
                    let (want, _) = BlockSelect::new(gpu, pre, &SelectConfig::new(opts))
                        .unwrap()
                        .select_inputs(gpu, &SelectInputs::new(&pq, &pk).evict(nosa.then_some(&pe)))
                        .unwrap();
                    let want = gpu.read_u32(&want).unwrap();
                    for h in 0..hkv {
                        for i in 0..n_q {
                            let t = len - n_q + i;
                            let w = &want[(h * len + t) * opts.k..(h * len + t + 1) * opts.k];
                            let r = ((s * hkv + h) * n_q + i) * opts.k;
                            assert_eq!(
                                &got[r..r + opts.k],
                                w,
                                "{:?} evict {} sequence {s} (length {len}) kv head {h} token {t}",
                                opts.scoring,
                                opts.evict
                            );
                        }
                    }
                }
            }
            // The next op starts its own state: pool from the start again.
            lens = prompts.to_vec();
        }
    }
}

/// Rows `t0..t1` of each kv head of sequence `b` of a `[batch, heads, cap, width]` tensor, as
/// `[1, heads, t1 - t0, width]`.
fn rows_of(
    x: &[f32],
    b: usize,
    heads: usize,
    cap: usize,
    width: usize,
    t0: usize,
    t1: usize,
) -> Vec<f32> {
    (0..heads)
        .flat_map(|h| {
            let at = (b * heads + h) * cap * width;
            x[at + t0 * width..at + t1 * width].to_vec()
        })
        .collect()
}

/// The whole decoding path over a `KvCache`: prompts of different lengths appended at once
/// (ragged), then one token per step; each step selects from the cache's pooled state (NOSA:
/// eviction score = the cached bias) and attends over the selection with the bias. Every step
/// equals prefill over the same tokens: the cache rows bit for bit, the selection bit for bit,
/// O and LSE to float tolerance (full decoding too).
#[test]
fn kv_cache_steps_equal_prefill() {
    use sparse_attn::{CacheConfig, CacheShape, KvCache};
    let Some(gpu) = common::gpu() else { return };
    let seed = Rng::fresh_seed();
    eprintln!("seed {seed}");
    let mut rng = Rng::new(seed);
    let (b, hq, hkv, d, cap) = (2, 4, 2, 32, 200);
    let opts = SelectOptions::nosa_budget(16, 6, 1, 1, 2).unwrap();
    let cs = CacheShape {
        batch: b,
        heads_kv: hkv,
        capacity: cap,
        head_dim: d,
    };
    let q_all = rng.normal_vec(b * hq * cap * d, 1.0);
    let k_all = rng.normal_vec(b * hkv * cap * d, 1.0);
    let v_all = rng.normal_vec(b * hkv * cap * d, 1.0);
    let e_all = rng.normal_vec(b * hkv * cap, 1.0);
    let mut cache = KvCache::new(
        &gpu,
        cs,
        &CacheConfig::new(DType::F32).bias(true).select(Some(opts)),
    )
    .unwrap();
    // Prompts of 100 and 130 tokens in one append of 130 rows (sequence 0's last 30 are NaN
    // and not counted).
    let prompts = [100u32, 130];
    let nan_tail = |x: Vec<f32>, width: usize| -> Vec<f32> {
        let per_head = 130 * width;
        x.into_iter()
            .enumerate()
            .map(|(i, v)| {
                let (s, t) = (i / (hkv * per_head), (i % per_head) / width);
                if t >= prompts[s] as usize {
                    f32::NAN
                } else {
                    v
                }
            })
            .collect()
    };
    let all_rows = |x: &[f32], width: usize, t0: usize, t1: usize| -> Vec<f32> {
        (0..b)
            .flat_map(|s| rows_of(x, s, hkv, cap, width, t0, t1))
            .collect()
    };
    let kn = gpu
        .upload(&[b, hkv, 130, d], &nan_tail(all_rows(&k_all, d, 0, 130), d))
        .unwrap();
    let vn = gpu
        .upload(&[b, hkv, 130, d], &nan_tail(all_rows(&v_all, d, 0, 130), d))
        .unwrap();
    let en = gpu
        .upload(&[b, hkv, 130], &nan_tail(all_rows(&e_all, 1, 0, 130), 1))
        .unwrap();
    let mut enc = gpu.encoder();
    cache
        .append(&gpu, &mut enc, &kn, &vn, Some(&en), Some(&prompts))
        .unwrap();
    gpu.queue().submit([enc.finish()]);
    assert_eq!(cache.lens(), &prompts);

    let step = cs.step(hq, 1);
    let keys = DecodeKeys::Sparse {
        block: opts.block,
        nsel: opts.k,
    };
    let sparse = DecodeAttention::new(&gpu, step, &DecodeConfig::new(keys).bias(true)).unwrap();
    let full =
        DecodeAttention::new(&gpu, step, &DecodeConfig::new(DecodeKeys::Full).bias(true)).unwrap();
    for n in 0..40 {
        // Each sequence's next token: rows at its current length (prompt tokens are prefill's;
        // the next token's k, v, bias come from the same pool of random rows).
        let lens: Vec<usize> = cache.lens().iter().map(|&l| l as usize).collect();
        let pick = |x: &[f32], width: usize, heads: usize| -> Vec<f32> {
            (0..b)
                .flat_map(|s| rows_of(x, s, heads, cap, width, lens[s], lens[s] + 1))
                .collect()
        };
        let mut enc = gpu.encoder();
        let k1 = gpu.upload(&[b, hkv, 1, d], &pick(&k_all, d, hkv)).unwrap();
        let v1 = gpu.upload(&[b, hkv, 1, d], &pick(&v_all, d, hkv)).unwrap();
        let e1 = gpu.upload(&[b, hkv, 1], &pick(&e_all, 1, hkv)).unwrap();
        let q1 = gpu.upload(&step.q_dims(), &pick(&q_all, d, hq)).unwrap();
        cache
            .append(&gpu, &mut enc, &k1, &v1, Some(&e1), None)
            .unwrap();
        let sel = gpu
            .upload_u32(&step.sel_dims(opts.k), &vec![7; b * hkv * opts.k])
            .unwrap();
        cache.select(&gpu, &mut enc, &q1, &sel).unwrap();
        let (os, of) = (
            poisoned(&gpu, &step, DType::F32),
            poisoned(&gpu, &step, DType::F32),
        );
        let x =
            DecodeInputs::new(&q1, cache.k(), cache.v(), cache.lens_tensor()).bias(cache.bias());
        sparse
            .encode(&gpu, &mut enc, &x.sel(Some(&sel)), &os)
            .unwrap();
        full.encode(&gpu, &mut enc, &x, &of).unwrap();
        gpu.queue().submit([enc.finish()]);
        let got_sel = gpu.read_u32(&sel).unwrap();
        let (gos, gls) = (gpu.read(&os.o).unwrap(), gpu.read(&os.lse).unwrap());
        let (gof, glf) = (gpu.read(&of.o).unwrap(), gpu.read(&of.lse).unwrap());
        let ck = gpu.read(cache.k()).unwrap();
        for s in 0..b {
            let len = lens[s] + 1;
            let ctx = format!("step {n} sequence {s} length {len}");
            assert_eq!(cache.lens()[s] as usize, len, "{ctx}");
            let want_k = rows_of(&k_all, s, hkv, cap, d, 0, len);
            assert_eq!(
                rows_of(&ck, s, hkv, cap, d, 0, len),
                want_k,
                "cache k ({ctx})"
            );
            // Prefill over the sequence's len tokens: its last row is this step.
            let pre = AttnShape::new(1, hq, hkv, len, d);
            let pq = gpu
                .upload(&pre.q_dims(), &rows_of(&q_all, s, hq, cap, d, 0, len))
                .unwrap();
            let pk = gpu.upload(&pre.kv_dims(), &want_k).unwrap();
            let pv = gpu
                .upload(&pre.kv_dims(), &rows_of(&v_all, s, hkv, cap, d, 0, len))
                .unwrap();
            let pe = gpu
                .upload(&[1, hkv, len], &rows_of(&e_all, s, hkv, cap, 1, 0, len))
                .unwrap();
            let (psel, _) = BlockSelect::new(&gpu, pre, &SelectConfig::new(opts))
                .unwrap()
                .select_inputs(&gpu, &SelectInputs::new(&pq, &pk).evict(Some(&pe)))
                .unwrap();
            let ps =
                SparseAttention::new(&gpu, pre, &SparseConfig::for_selection(&opts).bias(true))
                    .unwrap()
                    .forward(
                        &gpu,
                        &SparseInputs::new(&pq, &pk, &pv, &psel).bias(Some(&pe)),
                    )
                    .unwrap();
            let fa = FullAttention::new(
                &gpu,
                pre,
                &FullConfig::new(AttnOptions::causal(true)).bias(true),
            )
            .unwrap();
            let pf = AttnOutput::empty_as(&gpu, &pre, DType::F32).unwrap();
            let mut enc = gpu.encoder();
            fa.encode_forward(&gpu, &mut enc, Qkv::new(&pq, &pk, &pv).bias(Some(&pe)), &pf)
                .unwrap();
            gpu.queue().submit([enc.finish()]);
            let last = |x: &[f32], w: usize, heads: usize| -> Vec<f32> {
                (0..heads)
                    .flat_map(|h| x[(h * len + len - 1) * w..(h * len + len) * w].to_vec())
                    .collect()
            };
            let psel = gpu.read_u32(&psel).unwrap();
            let k = opts.k;
            for h in 0..hkv {
                let r = (s * hkv + h) * k;
                assert_eq!(
                    &got_sel[r..r + k],
                    &psel[(h * len + len - 1) * k..(h * len + len) * k],
                    "selection kv head {h} ({ctx})"
                );
            }
            let mine = |x: &[f32], w: usize| x[s * hq * w..(s + 1) * hq * w].to_vec();
            for (what, got, want) in [
                (
                    "sparse O",
                    mine(&gos, d),
                    last(&gpu.read(&ps.o).unwrap(), d, hq),
                ),
                (
                    "sparse LSE",
                    mine(&gls, 1),
                    last(&gpu.read(&ps.lse).unwrap(), 1, hq),
                ),
                (
                    "full O",
                    mine(&gof, d),
                    last(&gpu.read(&pf.o).unwrap(), d, hq),
                ),
                (
                    "full LSE",
                    mine(&glf, 1),
                    last(&gpu.read(&pf.lse).unwrap(), 1, hq),
                ),
            ] {
                let e = compare(&got, &want);
                assert!(e.within(TOL), "{what} {e:?} ({ctx})");
            }
        }
    }
    // Full: the capacity is an error that says so, and nothing is appended.
    let mut c2 = KvCache::new(
        &gpu,
        CacheShape { capacity: 2, ..cs },
        &CacheConfig::new(DType::F32),
    )
    .unwrap();
    let k3 = gpu
        .upload(&[b, hkv, 3, d], &vec![0.0; b * hkv * 3 * d])
        .unwrap();
    let mut enc = gpu.encoder();
    let e = c2
        .append(&gpu, &mut enc, &k3, &k3, None, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("exceed the cache's capacity of 2"), "{e}");
    assert_eq!(c2.lens(), &[0, 0]);
}

/// A `DecodeLayer`'s steps (every dispatch of a step in one compute pass, bind groups kept from
/// step to step) equal the same cache, selection and attention recorded op by op; once each of
/// the rotating input tensors has been seen, the layer makes no new bind groups.
#[test]
fn decode_layer_steps_keep_their_bind_groups_and_equal_the_ops() {
    use sparse_attn::decode::{DecodeLayer, LayerConfig};
    use sparse_attn::{CacheConfig, CacheShape, KvCache};
    let Some(gpu) = common::gpu() else { return };
    let seed = Rng::fresh_seed();
    eprintln!("seed {seed}");
    let mut rng = Rng::new(seed);
    let (b, hq, hkv, d, cap, prompt) = (2, 4, 2, 32, 160, 100);
    let opts = SelectOptions::nosa_budget(16, 6, 1, 1, 2).unwrap();
    let cs = CacheShape {
        batch: b,
        heads_kv: hkv,
        capacity: cap,
        head_dim: d,
    };
    let mut layer = DecodeLayer::new(
        &gpu,
        &LayerConfig {
            bias: true,
            select: Some(opts),
            ..LayerConfig::new(cs, hq, DType::F32)
        },
    )
    .unwrap();
    let mut cache = KvCache::new(
        &gpu,
        cs,
        &CacheConfig::new(DType::F32).bias(true).select(Some(opts)),
    )
    .unwrap();
    let step = cs.step(hq, 1);
    let keys = DecodeKeys::Sparse {
        block: opts.block,
        nsel: opts.k,
    };
    let att = DecodeAttention::new(&gpu, step, &DecodeConfig::new(keys).bias(true)).unwrap();
    let kp = gpu
        .upload(
            &[b, hkv, prompt, d],
            &rng.normal_vec(b * hkv * prompt * d, 1.0),
        )
        .unwrap();
    let vp = gpu
        .upload(
            &[b, hkv, prompt, d],
            &rng.normal_vec(b * hkv * prompt * d, 1.0),
        )
        .unwrap();
    let ep = gpu
        .upload(&[b, hkv, prompt], &rng.normal_vec(b * hkv * prompt, 1.0))
        .unwrap();
    let mut enc = gpu.encoder();
    layer
        .append(&gpu, &mut enc, &kp, &vp, Some(&ep), None)
        .unwrap();
    cache
        .append(&gpu, &mut enc, &kp, &vp, Some(&ep), None)
        .unwrap();
    gpu.queue().submit([enc.finish()]);
    // Three sets of step inputs and outputs, rewritten every step (fresh values, NaN-poisoned
    // outputs) as a model's activations would be, so the layer meets each buffer again.
    let pool: Vec<[sparse_attn::Tensor; 5]> = (0..3)
        .map(|_| {
            [
                gpu.empty(&step.q_dims(), DType::F32).unwrap(),
                gpu.empty(&step.q_dims(), DType::F32).unwrap(),
                gpu.empty(&[b, hkv, 1, d], DType::F32).unwrap(),
                gpu.empty(&[b, hkv, 1, d], DType::F32).unwrap(),
                gpu.empty(&[b, hkv, 1], DType::F32).unwrap(),
            ]
        })
        .collect();
    let sel = gpu
        .upload_u32(&step.sel_dims(opts.k), &vec![7; b * hkv * opts.k])
        .unwrap();
    let mut kept = vec![];
    for n in 0..12 {
        let [q, o, k, v, e] = &pool[n % 3];
        for t in [q, k, v, e] {
            gpu.write(t, &rng.normal_vec(t.len(), 1.0)).unwrap();
        }
        gpu.write(o, &vec![f32::NAN; o.len()]).unwrap();
        let o_ops = poisoned(&gpu, &step, DType::F32);
        let mut enc = gpu.encoder();
        layer
            .encode_step(&gpu, &mut enc, q, k, v, Some(e), o)
            .unwrap();
        gpu.queue().submit([enc.finish()]);
        let mut enc = gpu.encoder();
        cache.append(&gpu, &mut enc, k, v, Some(e), None).unwrap();
        cache.select(&gpu, &mut enc, q, &sel).unwrap();
        let x = DecodeInputs::new(q, cache.k(), cache.v(), cache.lens_tensor())
            .bias(cache.bias())
            .sel(Some(&sel));
        att.encode(&gpu, &mut enc, &x, &o_ops).unwrap();
        gpu.queue().submit([enc.finish()]);
        let (got, want) = (gpu.read(o).unwrap(), gpu.read(&o_ops.o).unwrap());
        // The same kernels on the same values: equal up to nothing but NaN-free.
        let e = compare(&got, &want);
        assert!(e.within(0.0), "step {n}: layer against ops: {e:?}");
        kept.push(layer.kept_bind_groups());
    }
    assert!(kept[2] > 0, "no bind groups kept: {kept:?}");
    assert!(
        kept[2..].iter().all(|&k| k == kept[2]),
        "the layer made bind groups after every input had been seen: {kept:?}"
    );
}
