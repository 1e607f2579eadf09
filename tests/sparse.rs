//! Block-sparse attention on the GPU against the f64 reference (full attention restricted to the
//! selected blocks), with selections from the GPU selector and random ones.

use crate::common;

use sparse_attn::SparseInputs;
use sparse_attn::gpu::{DType, Gpu, round_f16};
use sparse_attn::ops::select::BlockSelect;
use sparse_attn::ops::sparse::{SparseAttention, SparseKernel};
use sparse_attn::problem::SparseOptions;
use sparse_attn::problem::{SENTINEL, Scoring, SelectOptions};
use sparse_attn::reference::sparse as refsp;
use sparse_attn::reference::{Rng, compare};
use sparse_attn::{AttnGrads, AttnOptions, AttnOutput, AttnShape, FullAttention};
use sparse_attn::{FullConfig, SelectConfig, SparseConfig};

/// Relative L2 error allowed for f32 against the f64 reference (observed ~1e-7).
const TOL: f64 = 2e-5;
/// f16 storage: inputs rounded before the reference sees them; outputs rounded (~3e-4 in L2).
const TOL_F16: f64 = 2e-3;

fn shape(b: usize, hq: usize, hkv: usize, sq: usize, sk: usize, d: usize) -> AttnShape {
    AttnShape {
        batch: b,
        heads_q: hq,
        heads_kv: hkv,
        seq_q: sq,
        seq_k: sk,
        head_dim: d,
    }
}

/// Random selections: `nsel` slots per row, some blocks, ascending, SENTINEL-padded.
fn random_selection(rng: &mut Rng, s: &AttnShape, block: usize, nsel: usize) -> Vec<u32> {
    let nb = s.seq_k.div_ceil(block);
    let rows = s.batch * s.heads_kv * s.seq_q;
    let mut out = Vec::with_capacity(rows * nsel);
    for _ in 0..rows {
        let mut row: Vec<u32> = (0..nsel)
            .map(|_| (rng.next_u64() % (nb as u64 + 2)) as u32)
            .map(|b| if b as usize >= nb { SENTINEL } else { b })
            .collect();
        row.sort_unstable();
        row.dedup();
        row.resize(nsel, SENTINEL);
        out.extend(row);
    }
    out
}

fn poisoned(gpu: &Gpu, s: &AttnShape, dt: DType) -> AttnOutput {
    AttnOutput {
        o: gpu
            .upload_as(&s.q_dims(), &vec![f32::NAN; s.q_len()], dt)
            .unwrap(),
        lse: gpu
            .upload(&s.lse_dims(), &vec![f32::NAN; s.lse_len()])
            .unwrap(),
    }
}

#[allow(clippy::too_many_arguments)]
fn check(
    gpu: &Gpu,
    s: AttnShape,
    o: SparseOptions,
    nsel: usize,
    sel: &[u32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    bias: Option<&[f32]>,
    dt: DType,
    (fwd, bwd): (SparseKernel, SparseKernel),
    ctx: &str,
) -> bool {
    let op = match SparseAttention::new(
        gpu,
        s,
        &SparseConfig::new(o, nsel)
            .bias(bias.is_some())
            .dtype(dt)
            .kernels(fwd, bwd),
    ) {
        Ok(op) => op,
        // GPU-only kernels run in scripts/gpu-check.sh on a machine that has them.
        // The row kernels are causal only; groups past 8 heads can need more workgroup memory
        // than a device has (lavapipe's 32 KiB at 16 heads and head_dim 128).
        Err(e)
            if (fwd == SparseKernel::Rows || bwd == SparseKernel::Rows)
                && (!o.causal || s.group() > 8) =>
        {
            eprintln!("skipped ({ctx}): {e}");
            return false;
        }
        Err(e) if fwd == SparseKernel::Coop || bwd == SparseKernel::Coop => {
            // The tensor-core sparse kernels take up to 16 query heads per kv head.
            let by_shape = s.group() > 16;
            common::skip_coop(gpu, &format!("coop sparse kernels ({ctx})"), by_shape, &e);
            return false;
        }
        Err(e) => panic!("{ctx}: {e}"),
    };
    if fwd != SparseKernel::Auto {
        assert_eq!(op.forward_kernel(), fwd, "{ctx}");
    }
    if bwd != SparseKernel::Auto {
        assert_eq!(op.backward_kernel(), bwd, "{ctx}");
    }
    if bwd == SparseKernel::Rows && op.dkdv_on_tensor_cores() {
        eprintln!("row dQ, dK/dV on tensor cores: {ctx}");
    }
    let tol = if dt == DType::F16 { TOL_F16 } else { TOL };
    let up = |dims: &[usize], x: &[f32]| gpu.upload_as(dims, x, dt).unwrap();
    let tsel = gpu.upload_u32(&op.selection_dims(), sel).unwrap();
    let tb = bias.map(|b| gpu.upload(&op.bias_dims(), b).unwrap());
    let (tq, tk, tv) = (up(&s.q_dims(), q), up(&s.kv_dims(), k), up(&s.kv_dims(), v));
    let out = poisoned(gpu, &s, dt);
    let mut enc = gpu.encoder();
    op.encode_forward(
        gpu,
        &mut enc,
        &SparseInputs::new(&tq, &tk, &tv, &tsel).bias(tb.as_ref()),
        &out,
    )
    .expect(ctx);
    gpu.queue().submit([enc.finish()]);
    let want = refsp::forward(&s, &o, q, k, v, sel, nsel, bias).expect(ctx);
    let got_lse = gpu.read(&out.lse).unwrap();
    // Rows that see no key: LSE = -inf on both sides; compare the finite ones.
    let (mut gl, mut wl) = (Vec::new(), Vec::new());
    for (&g, &w) in got_lse.iter().zip(&want.lse) {
        if w == f32::NEG_INFINITY {
            assert_eq!(g, f32::NEG_INFINITY, "empty row must give LSE -inf ({ctx})");
        } else {
            gl.push(g);
            wl.push(w);
        }
    }
    let e = compare(&gl, &wl);
    assert!(e.within(tol), "LSE {e:?} ({ctx})");
    let e = compare(&gpu.read(&out.o).unwrap(), &want.o);
    assert!(e.within(tol), "O {e:?} ({ctx})");

    // Backward, outputs poisoned first.
    let mut rng = Rng::new(q.len() as u64);
    let mut d_o = rng.normal_vec(s.q_len(), 1.0);
    if dt == DType::F16 {
        d_o = round_f16(&d_o);
    }
    let grads = AttnGrads {
        dq: up(&s.q_dims(), &vec![f32::NAN; s.q_len()]),
        dk: up(&s.kv_dims(), &vec![f32::NAN; s.kv_len()]),
        dv: up(&s.kv_dims(), &vec![f32::NAN; s.kv_len()]),
        dbias: bias.map(|b| {
            gpu.upload(&op.bias_dims(), &vec![f32::NAN; b.len()])
                .unwrap()
        }),
    };
    let mut enc = gpu.encoder();
    op.encode_backward(
        gpu,
        &mut enc,
        &SparseInputs::new(&tq, &tk, &tv, &tsel).bias(tb.as_ref()),
        &out,
        &up(&s.q_dims(), &d_o),
        &grads,
    )
    .expect(ctx);
    gpu.queue().submit([enc.finish()]);
    let want = refsp::backward(&s, &o, q, k, v, sel, nsel, bias, &d_o).expect(ctx);
    for (name, t, w) in [
        ("dQ", &grads.dq, &want.dq),
        ("dK", &grads.dk, &want.dk),
        ("dV", &grads.dv, &want.dv),
    ] {
        let e = compare(&gpu.read(t).unwrap(), w);
        assert!(e.within(tol), "{name} {e:?} ({ctx})");
    }
    if let (Some(t), Some(w), Some(b)) = (&grads.dbias, &want.dbias, bias) {
        // Against the size of its operands (its terms cancel: see common::dbias_error). Row
        // (h, i) sees the keys of its selected blocks (SENTINEL: none), causally.
        let off = s.q_offset();
        let sees = |bb: usize, h: usize, i: usize, j: usize| {
            let row = ((bb * s.heads_kv + h / s.group()) * s.seq_q + i) * nsel;
            sel[row..row + nsel].contains(&((j / o.block) as u32)) && (!o.causal || j <= i + off)
        };
        let got = gpu.read(t).unwrap();
        let scale = o.attn().scale_for(s.head_dim);
        let e = common::dbias_error(&s, scale, (q, k, v, b, &d_o), sees, &got, w);
        assert!(
            e <= tol,
            "d bias: error {e:.3e} of its operands' size ({ctx})"
        );
    }
    true
}

#[test]
fn sparse_forward_and_backward_match_reference() {
    let Some(gpu) = common::gpu() else { return };
    let portable = (SparseKernel::Portable, SparseKernel::Portable);
    suite(&gpu, DType::F32, portable, |_| true);
}

/// f16 storage (native where the device has SHADER_F16, packed in u32 words elsewhere) on the
/// cases marked for it (every head dim, bias, GQA, causal and not); the selector on f16 tensors
/// must pick what it picks on the same values in f32.
#[test]
fn sparse_f16_forward_and_backward_match_reference() {
    let Some(gpu) = common::gpu() else { return };
    let portable = (SparseKernel::Portable, SparseKernel::Portable);
    suite(&gpu, DType::F16, portable, |c| c.f16);
}

/// Groups past this many heads per kv head run the row kernels only under scripts/gpu-check.sh:
/// on lavapipe each of them is a long compilation (the G 16 forward and dQ, f32 and f16: 125 of
/// this test's 228 s on a 2-core machine, LLVM building their coroutine frames), and `Auto`
/// gives the row kernels groups of up to 4.
const ROWS_LAVAPIPE_GROUP: usize = 8;

/// The row kernels (forward and dQ; `Auto`'s choice for groups of up to 4), f32 and f16, on
/// every causal case of up to 8 heads per kv head (every group the device's memory allows under
/// scripts/gpu-check.sh).
#[test]
fn rows_sparse_forward_and_backward_match_reference() {
    let Some(gpu) = common::gpu() else { return };
    let rows = (SparseKernel::Rows, SparseKernel::Rows);
    let group_ok = |c: &Case| common::gpu_check() || c.shape.group() <= ROWS_LAVAPIPE_GROUP;
    suite(&gpu, DType::F32, rows, group_ok);
    suite(&gpu, DType::F16, rows, |c| c.f16 && group_ok(c));
}

/// Tensor cores: the cooperative-matrix forward and backward (f16) on every case they take
/// (groups of up to 16 heads, blocks of multiples of 16). Runs where the device has cooperative
/// matrices (the H100 via scripts/gpu-check.sh); elsewhere every case is skipped with the
/// reason.
#[test]
fn coop_sparse_forward_and_backward_match_reference() {
    let Some(gpu) = common::gpu() else { return };
    suite(
        &gpu,
        DType::F16,
        (SparseKernel::Coop, SparseKernel::Coop),
        |_| true,
    );
}

/// `Auto`: the row kernels for causal groups of up to 4 whose selected keys fit a workgroup,
/// tensor cores for larger groups of native f16 where the device runs them, the portable kernels
/// otherwise; checked on every case of the suite (the kernels it picks are tested there), f32
/// and f16. Building the ops compiles nothing on lavapipe (that happens at the first dispatch).
#[test]
fn automatic_sparse_kernels() {
    let Some(gpu) = common::gpu() else { return };
    let native_f16 = gpu
        .features()
        .contains(sparse_attn::wgpu::Features::SHADER_F16);
    for c in cases() {
        let s = c.shape;
        let o = SparseOptions {
            block: c.block,
            causal: c.causal,
            scale: None,
        };
        for dt in [DType::F32, DType::F16] {
            let op = SparseAttention::new(
                &gpu,
                s,
                &SparseConfig::new(o, c.nsel).bias(c.bias).dtype(dt),
            )
            .unwrap();
            // The rule as ops/sparse.rs states it (rows_supported, ROWS_MAX_GROUP).
            let rows = c.causal && s.group() <= 4 && c.nsel * c.block <= 2048;
            let on_coop = |supported: sparse_attn::Result<()>| {
                dt == DType::F16 && native_f16 && supported.is_ok()
            };
            let want = |coop: bool| match (rows, coop) {
                (true, _) => SparseKernel::Rows,
                (_, true) => SparseKernel::Coop,
                _ => SparseKernel::Portable,
            };
            let (d, g) = (s.head_dim, s.group());
            let fwd_coop = on_coop(sparse_attn::ops::coop::sparse_supported(
                &gpu, d, g, c.block,
            ));
            let bwd_coop = on_coop(sparse_attn::ops::coop::sparse_backward_supported(
                &gpu, d, g, c.block,
            ));
            let ctx = format!("{s:?}, block {}, {dt:?}", c.block);
            assert_eq!(op.forward_kernel(), want(fwd_coop), "forward, {ctx}");
            assert_eq!(op.backward_kernel(), want(bwd_coop), "backward, {ctx}");
        }
    }
}

/// One case of the suite: the shape, blocks of `block`, `nsel` selected per row, causal or not,
/// with a per-key bias or not; `f16`: also run with f16 storage.
#[derive(Clone, Copy)]
struct Case {
    shape: AttnShape,
    block: usize,
    nsel: usize,
    causal: bool,
    bias: bool,
    f16: bool,
}

fn cases() -> Vec<Case> {
    let c = |shape, block, nsel, causal, bias, f16| Case {
        shape,
        block,
        nsel,
        causal,
        bias,
        f16,
    };
    vec![
        c(shape(1, 16, 1, 100, 100, 64), 16, 4, true, false, false), // SSA-like GQA 16:1
        c(shape(1, 2, 2, 10, 10, 32), 16, 1, true, true, true),      // seq < B
        c(shape(2, 8, 2, 300, 300, 32), 64, 3, true, true, true),    // B 64, GQA 4:1
        c(shape(1, 4, 4, 130, 130, 128), 32, 3, false, false, true), // non-causal, 1:1
        c(shape(1, 4, 1, 7, 700, 64), 128, 4, true, true, true),     // queries at the end, B 128
        c(shape(1, 32, 1, 40, 40, 16), 16, 2, true, false, true),    // 32 heads per group
        // Long enough that dK/dV scans several rounds of tokens and fills many token tiles;
        // a group of 3 leaves padding columns in every tile.
        c(shape(1, 6, 2, 700, 700, 32), 16, 5, true, true, false),
        // Tensor-core shapes: a group of 16 at head_dim 128, blocks of 64 (the last one short).
        c(shape(1, 16, 1, 400, 400, 128), 64, 3, true, false, false),
        // Bias with GQA 4:1, non-causal, odd lengths; and a group of 16 on tensor-core shapes.
        c(shape(1, 8, 2, 77, 77, 64), 16, 3, false, true, false),
        c(shape(1, 16, 1, 150, 150, 64), 32, 3, true, true, true),
    ]
}

/// The cases `pick` takes, run by `kernels` (forward, backward).
fn suite(
    gpu: &Gpu,
    dt: DType,
    kernels: (SparseKernel, SparseKernel),
    pick: impl Fn(&Case) -> bool,
) {
    let seed = Rng::fresh_seed();
    let fwd = kernels.0;
    eprintln!(
        "seed {seed} ({dt:?}, {} forward, {} backward)",
        fwd.name(),
        kernels.1.name()
    );
    let mut ran = 0;
    let held = |x: Vec<f32>| if dt == DType::F16 { round_f16(&x) } else { x };
    for (i, case) in cases().into_iter().enumerate() {
        if !pick(&case) {
            continue;
        }
        let Case {
            shape: s,
            block,
            nsel,
            causal,
            bias: with_bias,
            ..
        } = case;
        let seed = seed.wrapping_add(i as u64);
        let mut rng = Rng::new(seed);
        let o = SparseOptions {
            block,
            causal,
            scale: None,
        };
        let q = held(rng.normal_vec(s.q_len(), 1.0));
        let k = held(rng.normal_vec(s.kv_len(), 1.0));
        let v = held(rng.normal_vec(s.kv_len(), 1.0));
        // Every other biased case with a bias of large magnitude (logits dominated by it); f16
        // with the moderate one only: with a dominant key, dS = P (dP - D) cancels and D comes
        // from the f16-rounded O (d bias off by 1e-2 relative at std 20, as in any f16
        // attention backward).
        let std = if i % 2 == 0 || dt == DType::F16 {
            1.0
        } else {
            20.0
        };
        let bias = with_bias.then(|| rng.normal_vec(s.batch * s.heads_kv * s.seq_k, std));
        let ctx = format!("seed {seed}, {s:?}, block {block}, nsel {nsel}, causal {causal}");
        // Random selections (with empty rows and sentinels) ...
        let sel = random_selection(&mut rng, &s, block, nsel);
        let ran_random = check(
            gpu,
            s,
            o,
            nsel,
            &sel,
            &q,
            &k,
            &v,
            bias.as_deref(),
            dt,
            kernels,
            &format!("random, {ctx}"),
        );
        if !ran_random {
            continue;
        }
        ran += 1;
        // ... and the selector's own output.
        if causal {
            let so = SelectOptions {
                block,
                k: nsel.min(s.seq_k.div_ceil(block)),
                n_init: 0,
                n_local: 0,
                scoring: Scoring::Ssa,
                causal,
                scale: None,
                evict: 0,
            };
            let op = BlockSelect::new(gpu, s, &SelectConfig::new(so).dtype(dt)).unwrap();
            let (tsel, _) = op
                .select(
                    gpu,
                    &gpu.upload_as(&s.q_dims(), &q, dt).unwrap(),
                    &gpu.upload_as(&s.kv_dims(), &k, dt).unwrap(),
                )
                .unwrap();
            let sel = gpu.read_u32(&tsel).unwrap();
            if dt != DType::F32 {
                // Same values, same f32 arithmetic: the same blocks.
                let op32 = BlockSelect::new(gpu, s, &SelectConfig::new(so)).unwrap();
                let (t32, _) = op32
                    .select(
                        gpu,
                        &gpu.upload(&s.q_dims(), &q).unwrap(),
                        &gpu.upload(&s.kv_dims(), &k).unwrap(),
                    )
                    .unwrap();
                assert_eq!(sel, gpu.read_u32(&t32).unwrap(), "f16 selection ({ctx})");
            }
            check(
                gpu,
                s,
                o,
                so.k,
                &sel,
                &q,
                &k,
                &v,
                bias.as_deref(),
                dt,
                kernels,
                &format!("selected, {ctx}"),
            );
        }
    }
    eprintln!(
        "{} forward, {} backward, {dt:?}: {ran} cases ran",
        fwd.name(),
        kernels.1.name()
    );
}

/// With every block selected, sparse attention is full attention, forward and backward.
#[test]
fn sparse_with_all_blocks_equals_full_attention() {
    let Some(gpu) = common::gpu() else { return };
    let seed = Rng::fresh_seed();
    let mut rng = Rng::new(seed);
    for (s, block, causal) in [
        (shape(1, 4, 2, 150, 150, 64), 16, true),
        (shape(2, 2, 1, 70, 200, 32), 64, false),
    ] {
        let nb = s.seq_k.div_ceil(block);
        let q = gpu
            .upload(&s.q_dims(), &rng.normal_vec(s.q_len(), 1.0))
            .unwrap();
        let k = gpu
            .upload(&s.kv_dims(), &rng.normal_vec(s.kv_len(), 1.0))
            .unwrap();
        let v = gpu
            .upload(&s.kv_dims(), &rng.normal_vec(s.kv_len(), 1.0))
            .unwrap();
        let all: Vec<u32> = (0..s.batch * s.heads_kv * s.seq_q)
            .flat_map(|_| 0..nb as u32)
            .collect();
        let o = SparseOptions {
            block,
            causal,
            scale: None,
        };
        let sp = SparseAttention::new(&gpu, s, &SparseConfig::new(o, nb)).unwrap();
        let sel = gpu.upload_u32(&sp.selection_dims(), &all).unwrap();
        let got = sp
            .forward(&gpu, &SparseInputs::new(&q, &k, &v, &sel))
            .unwrap();
        let full = FullAttention::new(&gpu, s, &FullConfig::new(AttnOptions::causal(causal)))
            .unwrap()
            .forward(&gpu, &q, &k, &v)
            .unwrap();
        let e = compare(&gpu.read(&got.o).unwrap(), &gpu.read(&full.o).unwrap());
        assert!(e.within(TOL), "O {e:?} (seed {seed}, {s:?})");
        let e = compare(&gpu.read(&got.lse).unwrap(), &gpu.read(&full.lse).unwrap());
        assert!(e.within(TOL), "LSE {e:?} (seed {seed}, {s:?})");
        let d_o = gpu
            .upload(&s.q_dims(), &rng.normal_vec(s.q_len(), 1.0))
            .unwrap();
        let gs = sp
            .backward(&gpu, &SparseInputs::new(&q, &k, &v, &sel), &got, &d_o)
            .unwrap();
        let gf = FullAttention::new(&gpu, s, &FullConfig::new(AttnOptions::causal(causal)))
            .unwrap()
            .backward(&gpu, &q, &k, &v, &full, &d_o)
            .unwrap();
        for (n, a, b) in [
            ("dQ", &gs.dq, &gf.dq),
            ("dK", &gs.dk, &gf.dk),
            ("dV", &gs.dv, &gf.dv),
        ] {
            let e = compare(&gpu.read(a).unwrap(), &gpu.read(b).unwrap());
            assert!(e.within(TOL), "{n} {e:?} (seed {seed}, {s:?})");
        }
    }
}

#[test]
fn bad_sparse_input_names_the_problem() {
    let Some(gpu) = common::gpu() else { return };
    let s = shape(1, 4, 2, 50, 50, 32);
    let o = SparseOptions {
        block: 16,
        causal: true,
        scale: None,
    };
    let err = |o: SparseOptions, nsel| {
        SparseAttention::new(&gpu, s, &SparseConfig::new(o, nsel))
            .unwrap_err()
            .to_string()
    };
    assert!(err(SparseOptions { block: 48, ..o }, 2).contains("block size 48"));
    assert!(err(o, 0).contains("0 blocks"));
    let op = SparseAttention::new(&gpu, s, &SparseConfig::new(o, 2)).unwrap();
    let t = |dims: &[usize]| gpu.upload(dims, &vec![0.0; dims.iter().product()]).unwrap();
    let (q, k, v) = (t(&s.q_dims()), t(&s.kv_dims()), t(&s.kv_dims()));
    let wrong_sel = gpu.upload_u32(&[1, 2, 50, 3], &vec![0; 300]).unwrap();
    let e = op
        .forward(&gpu, &SparseInputs::new(&q, &k, &v, &wrong_sel))
        .unwrap_err();
    assert!(e.to_string().contains("selection"), "{e}");
    let sel = gpu.upload_u32(&op.selection_dims(), &vec![0; 200]).unwrap();
    let b = t(&op.bias_dims());
    let e = op
        .forward(&gpu, &SparseInputs::new(&q, &k, &v, &sel).bias(Some(&b)))
        .unwrap_err();
    assert!(e.to_string().contains("built without"), "{e}");
    let float_sel = t(&op.selection_dims());
    let e = op
        .forward(&gpu, &SparseInputs::new(&q, &k, &v, &float_sel))
        .unwrap_err();
    assert!(e.to_string().contains("U32"), "{e}");
}
