//! SSA's alignment loss on the GPU against the f64 reference (PAPERS.md §2):
//! L = SmoothL1(h_full, sg(h_sparse)) + SmoothL1(h_sparse, sg(h_full)), and its gradients.

use crate::common;

use sparse_attn::gpu::Gpu;
use sparse_attn::ops::align::{AlignLoss, AlignOut};
use sparse_attn::reference::align::{align, smooth_l1};
use sparse_attn::reference::{Rng, compare};

/// f32 GPU sums against f64: relative error of the loss and of the gradients.
const TOL: f64 = 1e-5;

/// h_full ~ N(0, 1); h_sparse differs by N(0, 1.5): both SmoothL1 regimes (|d| < 1 and > 1).
fn inputs(rng: &mut Rng, n: usize) -> (Vec<f32>, Vec<f32>) {
    let a = rng.normal_vec(n, 1.0);
    let d = rng.normal_vec(n, 1.5);
    let b = a.iter().zip(&d).map(|(x, y)| x + y).collect();
    (a, b)
}

fn check(gpu: &Gpu, dims: &[usize], beta: f32, scale: f32, seed: u64) {
    let n: usize = dims.iter().product();
    let mut rng = Rng::new(seed);
    let (a, b) = inputs(&mut rng, n);
    let op = AlignLoss::new(gpu, dims, beta).unwrap();
    let out = AlignOut::empty(gpu, dims).unwrap();
    // Poison: anything the kernel does not write stays NaN and fails.
    gpu.fill(&out.loss, f32::NAN).unwrap();
    gpu.fill(&out.g_full, f32::NAN).unwrap();
    gpu.fill(&out.g_sparse, f32::NAN).unwrap();
    let (ta, tb) = (gpu.upload(dims, &a).unwrap(), gpu.upload(dims, &b).unwrap());
    let mut enc = gpu.encoder();
    op.encode(gpu, &mut enc, &ta, &tb, scale, &out).unwrap();
    gpu.queue().submit([enc.finish()]);
    let want = align(&a, &b, beta as f64, scale as f64).unwrap();
    let loss = gpu.read(&out.loss).unwrap()[0] as f64;
    let ctx = format!("dims {dims:?}, beta {beta}, scale {scale}, seed {seed}");
    assert!(
        loss.is_finite() && (loss - want.loss).abs() <= TOL * want.loss.abs().max(1e-6),
        "loss {loss} vs {} ({ctx})",
        want.loss
    );
    // Gradients are ψ(d)·scale/N: compared as ψ (order 1), so the relative error is meaningful.
    let unit = n as f64 / scale as f64;
    for (name, t, w) in [
        ("g_full", &out.g_full, &want.g_full),
        ("g_sparse", &out.g_sparse, &want.g_sparse),
    ] {
        let w32: Vec<f32> = w.iter().map(|&x| (x * unit) as f32).collect();
        let got: Vec<f32> = gpu
            .read(t)
            .unwrap()
            .iter()
            .map(|&g| (g as f64 * unit) as f32)
            .collect();
        let e = compare(&got, &w32);
        assert!(e.within(TOL), "{name} {e:?} ({ctx})");
    }
}

#[test]
fn align_matches_reference() {
    let Some(gpu) = common::gpu() else { return };
    let seed = Rng::fresh_seed();
    eprintln!("seed {seed}");
    // One element, a length not a multiple of 4, several workgroups with a partial one, a
    // [batch, heads, seq, head_dim] tensor; SSA's beta 1 and another beta and scale.
    let cases: [(&[usize], f32, f32); 6] = [
        (&[1], 1.0, 1.0),
        (&[7], 1.0, 1.0),
        (&[2, 3, 17, 16], 1.0, 10.0),
        (&[3 * 4096 + 5], 1.0, 1.0),
        (&[1, 4, 300, 64], 1.0, 0.25),
        (&[5, 33], 0.5, 2.0),
    ];
    for (i, (dims, beta, scale)) in cases.into_iter().enumerate() {
        check(&gpu, dims, beta, scale, seed.wrapping_add(i as u64));
    }
}

/// Tensors past the binding limit are split into several launches with the same result.
#[test]
fn align_splits_past_the_binding_limit() {
    let Some(gpu) = common::gpu_with(&sparse_attn::GpuOptions {
        max_storage_binding: Some(64 * 1024),
        ..Default::default()
    }) else {
        return;
    };
    let dims = [40_000];
    assert!(AlignLoss::new(&gpu, &dims, 1.0).unwrap().launches() > 1);
    check(&gpu, &dims, 1.0, 3.0, Rng::fresh_seed());
}

/// The reference's gradients are the derivatives of each stop-gradient term: d/dh_full of
/// SmoothL1(h_full, sg(h_sparse)) and d/dh_sparse of SmoothL1(h_sparse, sg(h_full)).
#[test]
fn reference_gradients_are_the_derivatives() {
    let mut rng = Rng::new(11);
    let (a, b) = inputs(&mut rng, 50);
    let n = a.len() as f64;
    let r = align(&a, &b, 1.0, 1.0).unwrap();
    let term = |x: &[f64], y: &[f64]| {
        x.iter()
            .zip(y)
            .map(|(p, q)| smooth_l1(p - q, 1.0))
            .sum::<f64>()
            / n
    };
    let (a64, b64): (Vec<f64>, Vec<f64>) = (
        a.iter().map(|&x| x as f64).collect(),
        b.iter().map(|&x| x as f64).collect(),
    );
    let h = 1e-6;
    for i in 0..a.len() {
        let (mut up, mut dn) = (a64.clone(), a64.clone());
        up[i] += h;
        dn[i] -= h;
        let fd = (term(&up, &b64) - term(&dn, &b64)) / (2.0 * h);
        assert!(
            (fd - r.g_full[i]).abs() < 1e-6,
            "g_full[{i}]: {fd} vs {}",
            r.g_full[i]
        );
        let (mut up, mut dn) = (b64.clone(), b64.clone());
        up[i] += h;
        dn[i] -= h;
        let fd = (term(&up, &a64) - term(&dn, &a64)) / (2.0 * h);
        assert!(
            (fd - r.g_sparse[i]).abs() < 1e-6,
            "g_sparse[{i}]: {fd} vs {}",
            r.g_sparse[i]
        );
    }
    // Identical streams: no loss, no gradient.
    let z = align(&a, &a, 1.0, 1.0).unwrap();
    assert_eq!(z.loss, 0.0);
    assert!(z.g_full.iter().chain(&z.g_sparse).all(|&g| g == 0.0));
}

#[test]
fn bad_align_input_names_the_problem() {
    let Some(gpu) = common::gpu() else { return };
    let err = |r: sparse_attn::Result<AlignLoss>| r.unwrap_err().to_string();
    assert!(err(AlignLoss::new(&gpu, &[], 1.0)).contains("non-empty"));
    assert!(err(AlignLoss::new(&gpu, &[4, 0], 1.0)).contains("non-empty"));
    assert!(err(AlignLoss::new(&gpu, &[8], 0.0)).contains("beta"));
    assert!(err(AlignLoss::new(&gpu, &[8], f32::NAN)).contains("beta"));
    let op = AlignLoss::new(&gpu, &[2, 8], 1.0).unwrap();
    let a = gpu.upload(&[2, 8], &[0.5; 16]).unwrap();
    let b = gpu.upload(&[2, 8], &[0.0; 16]).unwrap();
    let wrong = gpu.upload(&[16], &[0.0; 16]).unwrap();
    let out = AlignOut::empty(&gpu, &[2, 8]).unwrap();
    let mut enc = gpu.encoder();
    let e = op
        .encode(&gpu, &mut enc, &a, &wrong, 1.0, &out)
        .unwrap_err();
    assert!(e.to_string().contains("h_sparse has shape [16]"), "{e}");
    let e = op
        .encode(&gpu, &mut enc, &a, &b, f32::NAN, &out)
        .unwrap_err();
    assert!(e.to_string().contains("scale"), "{e}");
    // An output that is also an input.
    let e = op
        .encode(&gpu, &mut enc, &out.g_full, &b, 1.0, &out)
        .unwrap_err();
    assert!(e.to_string().contains("overlaps"), "{e}");
}
