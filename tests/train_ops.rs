//! Our kernels inside Burn: forward values and Burn's gradients through our ops against the f64
//! references (gradient of Σ O·W with random W, so dO = W), on Burn's own device and buffers.
#![cfg(feature = "train")]

use crate::common;

use burn::tensor::{Device, Int, Tensor, TensorData};
use sparse_attn::problem::{Scoring, SelectOptions};
use sparse_attn::reference::Rng;
use sparse_attn::reference::compare;
use sparse_attn::reference::{
    align, attention as ref_attn, select as ref_select, sparse as ref_sparse,
};
use sparse_attn::train::ops::{
    attention_with_bias, select_blocks_nosa, sparse_attention_with_bias,
};
use sparse_attn::train::{align_loss, attention, select_blocks, sparse_attention};
use sparse_attn::{AttnOptions, AttnShape};

/// Relative L2 tolerance: f32 kernels against f64 references on N(0, 1) inputs.
const TOL: f64 = 2e-3;

fn tensor(dev: &Device, data: &[f32], dims: [usize; 4]) -> Tensor<4> {
    Tensor::from_data(TensorData::new(data.to_vec(), dims), dev)
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}

fn check(name: &str, got: &[f32], want: &[f32], tol: f64) {
    let e = compare(got, want);
    assert!(e.within(tol), "{name}: {e:?} (tolerance {tol})");
}

struct Inputs {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    w: Vec<f32>,
}

fn inputs(s: &AttnShape, seed: u64) -> Inputs {
    let mut r = Rng::new(seed);
    Inputs {
        q: r.normal_vec(s.q_len(), 1.0),
        k: r.normal_vec(s.kv_len(), 1.0),
        v: r.normal_vec(s.kv_len(), 1.0),
        w: r.normal_vec(s.q_len(), 1.0),
    }
}

/// Full attention's O, LSE and dQ, dK, dV against the f64 reference, with f32 q, k, v and with
/// f16 ones (mixed-precision training: O and the gradients come back in f16, the LSE in f32;
/// the reference sees the f16-rounded inputs, so only f16's rounding of the results remains:
/// relative L2 at most 5e-3). Mixed f32/f16 inputs are an error that names them.
#[test]
fn full_attention_forward_and_gradients_match_the_reference() {
    use burn::tensor::{DType, FloatDType};
    let Some(rt) = common::burn_runtime() else {
        return;
    };
    let dev = rt.device.clone().autodiff();
    let f16 = |t: Tensor<4>| t.cast(FloatDType::F16);
    for (dtype, tol) in [(DType::F32, TOL), (DType::F16, 5e-3)] {
        let store = |t: Tensor<4>| if dtype == DType::F16 { f16(t) } else { t };
        // Odd lengths, one token, GQA, causal and not.
        for (i, (s, causal)) in [
            (AttnShape::new(1, 2, 2, 37, 32), true),
            (AttnShape::new(2, 4, 2, 19, 16), false),
            (AttnShape::new(1, 4, 1, 1, 64), true),
        ]
        .into_iter()
        .enumerate()
        {
            let seed = Rng::fresh_seed() + i as u64;
            eprintln!("{dtype:?} shape {s:?} causal {causal} seed {seed}");
            let x = inputs(&s, seed);
            let opts = AttnOptions::causal(causal);
            let q = store(tensor(&dev, &x.q, s.q_dims())).require_grad();
            let k = store(tensor(&dev, &x.k, s.kv_dims())).require_grad();
            let v = store(tensor(&dev, &x.v, s.kv_dims())).require_grad();
            let w = store(tensor(&dev, &x.w, s.q_dims()));
            // What the kernels see (the inputs rounded to the storage type).
            let (rq, rk, rv, rw) = (
                values(q.clone()),
                values(k.clone()),
                values(v.clone()),
                values(w.clone()),
            );
            let (o, lse) = attention(q.clone(), k.clone(), v.clone(), opts).unwrap();
            assert_eq!((o.dtype(), lse.dtype()), (dtype, DType::F32));
            let grads = (o.clone().cast(FloatDType::F32) * w.cast(FloatDType::F32))
                .sum()
                .backward();
            let want = ref_attn::forward(&s, &opts, &rq, &rk, &rv).unwrap();
            check("O", &values(o), &want.o, tol);
            check("LSE", &values(lse), &want.lse, tol);
            let g = ref_attn::backward(&s, &opts, &rq, &rk, &rv, &rw).unwrap();
            let dq = q.grad(&grads).unwrap();
            assert_eq!(dq.dtype(), dtype);
            check("dQ", &values(dq), &g.dq, tol);
            check("dK", &values(k.grad(&grads).unwrap()), &g.dk, tol);
            check("dV", &values(v.grad(&grads).unwrap()), &g.dv, tol);
        }
    }
    let s = AttnShape::new(1, 2, 2, 8, 16);
    let x = inputs(&s, 1);
    let e = attention(
        f16(tensor(&dev, &x.q, s.q_dims())),
        tensor(&dev, &x.k, s.kv_dims()),
        tensor(&dev, &x.v, s.kv_dims()),
        AttnOptions::causal(true),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("all f32 or all f16"), "{e}");
}

#[test]
fn inputs_that_are_permuted_or_sliced_are_read_correctly() {
    // A transposed view (not contiguous) and a slice that starts mid-buffer (unaligned offset).
    let Some(rt) = common::burn_runtime() else {
        return;
    };
    let dev = rt.device.clone().autodiff();
    let s = AttnShape::new(1, 2, 2, 21, 16);
    let x = inputs(&s, Rng::fresh_seed());
    let opts = AttnOptions::causal(true);
    // q given as [b, seq, heads, d] and swapped back.
    let mut q_bshd = vec![0f32; s.q_len()];
    for h in 0..2 {
        for t in 0..21 {
            for c in 0..16 {
                q_bshd[(t * 2 + h) * 16 + c] = x.q[(h * 21 + t) * 16 + c];
            }
        }
    }
    let q = tensor(&dev, &q_bshd, [1, 21, 2, 16]).swap_dims(1, 2);
    // k stored after one extra row: slicing it away leaves an offset of 16 floats.
    let mut k_pad = vec![7f32; 16];
    k_pad.extend_from_slice(&x.k);
    #[allow(clippy::single_range_in_vec_init)] // Burn's slice takes one range per dimension
    let k = Tensor::<2>::from_data(TensorData::new(k_pad, [1 + 2 * 21, 16]), &dev)
        .slice([1..1 + 2 * 21])
        .reshape([1, 2, 21, 16]);
    let v = tensor(&dev, &x.v, s.kv_dims());
    let (o, _) = attention(q, k, v, opts).unwrap();
    let want = ref_attn::forward(&s, &opts, &x.q, &x.k, &x.v).unwrap();
    check("O", &values(o), &want.o, TOL);
}

/// Selection against the reference, and sparse attention's O and gradients over it with f32
/// and with f16 q, k, v (the selection from f32 q and k, as the model runs it; the reference
/// sees the f16-rounded inputs; tolerance 5e-3 for f16).
#[test]
fn selection_and_sparse_attention_match_the_reference() {
    use burn::tensor::{DType, FloatDType};
    let Some(rt) = common::burn_runtime() else {
        return;
    };
    let dev = rt.device.clone().autodiff();
    for (dtype, tol) in [(DType::F32, TOL), (DType::F16, 5e-3)] {
        let store = |t: Tensor<4>| {
            if dtype == DType::F16 {
                t.cast(FloatDType::F16)
            } else {
                t
            }
        };
        for (i, (s, scoring)) in [
            (AttnShape::new(1, 4, 2, 77, 32), Scoring::Ssa),
            (AttnShape::new(2, 2, 1, 50, 16), Scoring::Moba),
        ]
        .into_iter()
        .enumerate()
        {
            let seed = Rng::fresh_seed() + i as u64;
            eprintln!("{dtype:?} shape {s:?} {scoring:?} seed {seed}");
            let x = inputs(&s, seed);
            let opts = SelectOptions {
                block: 16,
                k: 3,
                scoring,
                ..SelectOptions::ssa()
            };
            let q32 = tensor(&dev, &x.q, s.q_dims());
            let k32 = tensor(&dev, &x.k, s.kv_dims());
            let sel: Tensor<4, Int> = select_blocks(q32.clone(), k32.clone(), &opts).unwrap();
            let want_sel = ref_select::select(&s, &opts, &x.q, &x.k).unwrap();
            let got_sel = sel
                .clone()
                .into_data()
                .convert::<u32>()
                .try_to_vec::<u32>()
                .unwrap();
            assert_eq!(got_sel, want_sel.indices, "selection");
            let q = store(q32).require_grad();
            let k = store(k32).require_grad();
            let v = store(tensor(&dev, &x.v, s.kv_dims())).require_grad();
            let w = store(tensor(&dev, &x.w, s.q_dims()));
            let (rq, rk, rv, rw) = (
                values(q.clone()),
                values(k.clone()),
                values(v.clone()),
                values(w.clone()),
            );
            let (o, _) = sparse_attention(q.clone(), k.clone(), v.clone(), sel, &opts).unwrap();
            assert_eq!(o.dtype(), dtype);
            let loss = (o.clone().cast(FloatDType::F32) * w.cast(FloatDType::F32)).sum();
            let grads = loss.backward();
            let so = opts.sparse();
            let idx = &want_sel.indices;
            let want = ref_sparse::forward(&s, &so, &rq, &rk, &rv, idx, 3, None).unwrap();
            check("sparse O", &values(o), &want.o, tol);
            let g = ref_sparse::backward(&s, &so, &rq, &rk, &rv, idx, 3, None, &rw).unwrap();
            check("sparse dQ", &values(q.grad(&grads).unwrap()), &g.dq, tol);
            check("sparse dK", &values(k.grad(&grads).unwrap()), &g.dk, tol);
            check("sparse dV", &values(v.grad(&grads).unwrap()), &g.dv, tol);
        }
    }
}

#[test]
fn alignment_loss_and_its_gradients_match_the_reference() {
    let Some(rt) = common::burn_runtime() else {
        return;
    };
    let dev = rt.device.clone().autodiff();
    let seed = Rng::fresh_seed();
    eprintln!("seed {seed}");
    let mut r = Rng::new(seed);
    let dims = [2, 3, 29, 16];
    let n: usize = dims.iter().product();
    let hf = r.normal_vec(n, 1.0);
    let hs: Vec<f32> = hf.iter().map(|&x| x + 1.5 * r.normal() as f32).collect();
    let a = tensor(&dev, &hf, dims).require_grad();
    let b = tensor(&dev, &hs, dims).require_grad();
    // Scaled by 10 as in SSA's objective: the backward must scale the kernel's gradients.
    let loss = align_loss(a.clone(), b.clone(), 1.0).unwrap() * 10.0;
    let grads = loss.backward();
    let want = align::align(&hf, &hs, 1.0, 10.0).unwrap();
    let got = values(loss)[0] as f64;
    assert!(
        (got - 10.0 * want.loss).abs() <= 1e-4 * (10.0 * want.loss).abs(),
        "loss {got} vs {}",
        10.0 * want.loss
    );
    // Gradients are O(1/n): compare scaled by n (ψ, as tests/align.rs does).
    let psi = |g: Vec<f32>| g.iter().map(|x| x * n as f32).collect::<Vec<_>>();
    let want_f: Vec<f32> = want.g_full.iter().map(|&x| (x * n as f64) as f32).collect();
    let want_s: Vec<f32> = want
        .g_sparse
        .iter()
        .map(|&x| (x * n as f64) as f32)
        .collect();
    check(
        "g_full",
        &psi(values(a.grad(&grads).unwrap())),
        &want_f,
        1e-4,
    );
    check(
        "g_sparse",
        &psi(values(b.grad(&grads).unwrap())),
        &want_s,
        1e-4,
    );
}

#[test]
fn bad_inputs_are_errors() {
    let Some(rt) = common::burn_runtime() else {
        return;
    };
    let dev = rt.device.clone();
    let z = |d: [usize; 4]| Tensor::<4>::zeros(d, &dev);
    let e = attention(
        z([1, 3, 8, 16]),
        z([1, 2, 8, 16]),
        z([1, 2, 8, 16]),
        AttnOptions::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("multiple"), "{e}");
    let e = attention(
        z([1, 2, 8, 16]),
        z([1, 2, 8, 16]),
        z([1, 2, 9, 16]),
        AttnOptions::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("same shape"), "{e}");
    let opts = SelectOptions {
        k: 99,
        ..SelectOptions::ssa()
    };
    assert!(select_blocks(z([1, 2, 8, 16]), z([1, 2, 8, 16]), &opts).is_err());
    let sel = Tensor::<4, Int>::zeros([1, 2, 8, 5], &dev);
    let e = sparse_attention(
        z([1, 2, 8, 16]),
        z([1, 2, 8, 16]),
        z([1, 2, 8, 16]),
        sel,
        &SelectOptions {
            k: 2,
            ..SelectOptions::ssa()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("selection"), "{e}");
    let e = align_loss(z([1, 2, 8, 16]), z([1, 2, 8, 8]), 1.0).unwrap_err();
    assert!(e.to_string().contains("same shape"), "{e}");
    assert!(align_loss(z([1, 2, 8, 16]), z([1, 2, 8, 16]), 0.0).is_err());
}

/// NOSA inside Burn: full and sparse attention with a per-key bias (given as a transposed view,
/// as the model makes it), NOSA's selection from an eviction score, and the gradients of q, k,
/// v and the bias against the references.
#[test]
fn biased_attention_and_nosa_selection_match_the_reference() {
    let Some(rt) = common::burn_runtime() else {
        return;
    };
    let dev = rt.device.clone().autodiff();
    let s = AttnShape::new(1, 4, 2, 150, 32);
    let seed = Rng::fresh_seed();
    eprintln!("seed {seed}");
    let x = inputs(&s, seed);
    let mut r = Rng::new(seed ^ 0xb1a5);
    let bias: Vec<f32> = r.normal_vec(2 * 150, 1.5);
    // [b, seq, hkv] in memory, swapped to [b, hkv, seq].
    let mut bias_bsh = vec![0f32; bias.len()];
    for h in 0..2 {
        for t in 0..150 {
            bias_bsh[t * 2 + h] = bias[h * 150 + t];
        }
    }
    let tb = || {
        Tensor::<3>::from_data(TensorData::new(bias_bsh.clone(), [1, 150, 2]), &dev).swap_dims(1, 2)
    };
    let opts = AttnOptions::causal(true);
    let (q, k, v) = (
        tensor(&dev, &x.q, s.q_dims()).require_grad(),
        tensor(&dev, &x.k, s.kv_dims()).require_grad(),
        tensor(&dev, &x.v, s.kv_dims()).require_grad(),
    );
    let w = tensor(&dev, &x.w, s.q_dims());
    // Full attention with the bias.
    let b = tb().require_grad();
    let (o, _) =
        attention_with_bias(q.clone(), k.clone(), v.clone(), Some(b.clone()), opts).unwrap();
    let grads = (o.clone() * w.clone()).sum().backward();
    let want = ref_attn::forward_biased(&s, &opts, &x.q, &x.k, &x.v, Some(&bias)).unwrap();
    check("biased O", &values(o), &want.o, TOL);
    let g = ref_attn::backward_biased(&s, &opts, &x.q, &x.k, &x.v, Some(&bias), &x.w).unwrap();
    check("biased dQ", &values(q.grad(&grads).unwrap()), &g.dq, TOL);
    check("biased dK", &values(k.grad(&grads).unwrap()), &g.dk, TOL);
    check("biased dV", &values(v.grad(&grads).unwrap()), &g.dv, TOL);
    check(
        "d bias",
        &values(b.grad(&grads).unwrap()),
        &g.dbias.unwrap(),
        TOL,
    );
    // NOSA: the selection by the eviction score (here the bias itself), then sparse attention
    // with the bias.
    let so = SelectOptions::nosa_budget(16, 5, 1, 1, 1).unwrap();
    let sel = select_blocks_nosa(q.clone(), k.clone(), tb(), &so).unwrap();
    let sel_v: Vec<u32> = sel
        .clone()
        .into_data()
        .convert::<u32>()
        .try_to_vec::<u32>()
        .unwrap();
    let want_sel = ref_select::select_nosa(&s, &so, &x.q, &x.k, Some(&bias)).unwrap();
    assert_eq!(sel_v, want_sel.indices, "NOSA selection (seed {seed})");
    let b = tb().require_grad();
    let (o, _) =
        sparse_attention_with_bias(q.clone(), k.clone(), v.clone(), sel, Some(b.clone()), &so)
            .unwrap();
    let grads = (o.clone() * w).sum().backward();
    let sp = so.sparse();
    let want = ref_sparse::forward(&s, &sp, &x.q, &x.k, &x.v, &sel_v, so.k, Some(&bias)).unwrap();
    check("sparse biased O", &values(o), &want.o, TOL);
    let g =
        ref_sparse::backward(&s, &sp, &x.q, &x.k, &x.v, &sel_v, so.k, Some(&bias), &x.w).unwrap();
    check("sparse dQ", &values(q.grad(&grads).unwrap()), &g.dq, TOL);
    check("sparse dK", &values(k.grad(&grads).unwrap()), &g.dk, TOL);
    check("sparse dV", &values(v.grad(&grads).unwrap()), &g.dv, TOL);
    check(
        "sparse d bias",
        &values(b.grad(&grads).unwrap()),
        &g.dbias.unwrap(),
        TOL,
    );
    // A bias of the wrong shape is an error that names it.
    let bad = Tensor::<3>::zeros([1, 2, 149], &dev);
    let e = attention_with_bias(q, k, v, Some(bad), opts)
        .unwrap_err()
        .to_string();
    assert!(e.contains("bias") && e.contains("[1, 2, 150]"), "{e}");
}

/// The model's RMSNorm (`train::model::rms_norm`: the weight applied per group of rows so that
/// its gradient is reduced in two passes) against the f64 reference of y = x / rms(x) · γ, with
/// the gradients of Σ y·W: dγ_j = Σ_rows W·x̂, and dx as Burn's own `RmsNorm` gives it. Row
/// counts with groups of 128, 8 and 1.
#[test]
fn rms_norm_and_its_gradients_match_the_reference() {
    use burn::module::Param;
    use burn::nn::RmsNorm;
    use sparse_attn::train::model::rms_norm;
    let Some(rt) = common::burn_runtime() else {
        return;
    };
    let dev = rt.device.clone().autodiff();
    let seed = Rng::fresh_seed();
    eprintln!("seed {seed}");
    let mut r = Rng::new(seed);
    let eps = 1e-5;
    for [b, t, d] in [[2, 128, 48], [3, 40, 32], [1, 7, 16]] {
        let n = b * t;
        let (x, g, w) = (
            r.normal_vec(n * d, 1.0),
            r.normal_vec(d, 1.0),
            r.normal_vec(n * d, 1.0),
        );
        let t3 = |v: &[f32]| Tensor::<3>::from_data(TensorData::new(v.to_vec(), [b, t, d]), &dev);
        let norm = || RmsNorm {
            gamma: Param::from_tensor(
                Tensor::<1>::from_data(TensorData::new(g.clone(), [d]), &dev).require_grad(),
            ),
            epsilon: eps,
        };
        let (ours, burns) = (norm(), norm());
        let (xa, xb) = (t3(&x).require_grad(), t3(&x).require_grad());
        let ya = rms_norm(&ours, xa.clone());
        let yb = burns.forward(xb.clone());
        let ga = (ya.clone() * t3(&w)).sum().backward();
        let gb = (yb * t3(&w)).sum().backward();
        // f64 reference: y and dγ.
        let (mut y, mut dg) = (vec![0f32; n * d], vec![0f64; d]);
        for i in 0..n {
            let row = &x[i * d..(i + 1) * d];
            let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / d as f64;
            let inv = 1.0 / (ms + eps).sqrt();
            for j in 0..d {
                let xh = row[j] as f64 * inv;
                y[i * d + j] = (xh * g[j] as f64) as f32;
                dg[j] += w[i * d + j] as f64 * xh;
            }
        }
        let dg: Vec<f32> = dg.into_iter().map(|v| v as f32).collect();
        let ctx = format!("[{b}, {t}, {d}]");
        check(&format!("y {ctx}"), &values(ya), &y, TOL);
        check(
            &format!("dγ {ctx}"),
            &values(ours.gamma.val().grad(&ga).unwrap()),
            &dg,
            TOL,
        );
        let dx_burn = values(xb.grad(&gb).unwrap());
        check(
            &format!("dx {ctx}"),
            &values(xa.grad(&ga).unwrap()),
            &dx_burn,
            1e-5,
        );
    }
}

/// The model's RoPE (`train::model::rope`, elementwise) against the f64 reference of the
/// rotation of each pair (a, b) at position t: (a cos θ - b sin θ, b cos θ + a sin θ), θ =
/// t · theta^(-2i/d); and against Burn's `RotaryEncoding::apply` (values and dx of Σ y·W),
/// at start 0 and past it (decoding), head dims 48 and 16.
#[test]
fn rope_matches_the_reference_and_burns() {
    use burn::nn::RotaryEncodingConfig;
    use sparse_attn::train::model::rope;
    let Some(rt) = common::burn_runtime() else {
        return;
    };
    let dev = rt.device.clone().autodiff();
    let seed = Rng::fresh_seed();
    eprintln!("seed {seed}");
    let mut r = Rng::new(seed);
    for ([b, h, s, d], start) in [([2, 3, 40, 48], 0), ([1, 2, 5, 16], 77)] {
        let table = RotaryEncodingConfig::new(128, d).init(&dev);
        let n = b * h * s * d;
        let (x, w) = (r.normal_vec(n, 1.0), r.normal_vec(n, 1.0));
        let t4 =
            |v: &[f32]| Tensor::<4>::from_data(TensorData::new(v.to_vec(), [b, h, s, d]), &dev);
        let (xa, xb) = (t4(&x).require_grad(), t4(&x).require_grad());
        let ya = rope(&table, xa.clone(), start);
        let yb = table.apply(xb.clone(), start);
        let ga = (ya.clone() * t4(&w)).sum().backward();
        let gb = (yb.clone() * t4(&w)).sum().backward();
        let mut want = vec![0f32; n];
        for row in 0..b * h * s {
            let t = (start + row % s) as f64;
            for i in 0..d / 2 {
                let th = t * 10000f64.powf(-2.0 * i as f64 / d as f64);
                let (a, bb) = (x[row * d + 2 * i] as f64, x[row * d + 2 * i + 1] as f64);
                want[row * d + 2 * i] = (a * th.cos() - bb * th.sin()) as f32;
                want[row * d + 2 * i + 1] = (bb * th.cos() + a * th.sin()) as f32;
            }
        }
        let ctx = format!("[{b}, {h}, {s}, {d}] from {start}");
        check(&format!("y {ctx}"), &values(ya), &want, TOL);
        check(&format!("y = Burn's {ctx}"), &values(yb), &want, TOL);
        check(
            &format!("dx {ctx}"),
            &values(xa.grad(&ga).unwrap()),
            &values(xb.grad(&gb).unwrap()),
            1e-5,
        );
    }
}
