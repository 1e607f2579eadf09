//! GPU full attention against the f64 reference on fresh random inputs.

use crate::common;

use sparse_attn::FullConfig;
use sparse_attn::Qkv;
use sparse_attn::gpu::{Storage, round_f16};
use sparse_attn::reference::{self, Rng, compare};
use sparse_attn::{
    AttnOptions, AttnOutput, AttnShape, DType, FullAttention, Gpu, Variant, Variants,
};

/// Relative L2 error allowed for f32 kernels against the f64 reference. Observed errors are
/// ~1e-7..1e-6; the bound leaves room for long sums (seq 300, d 128) without hiding real bugs,
/// which show up as errors of 1e-2 or more.
const TOL: f64 = 2e-5;

/// The same for f16 storage: inputs are rounded to f16 before the reference sees them, so the
/// error is the rounding of the outputs (2^-11 relative per element, ~3e-4 in L2) plus f32
/// arithmetic; a wrong index or a lost tile is far above it.
const TOL_F16: f64 = 2e-3;

struct Case {
    shape: AttnShape,
    causal: bool,
}

fn run_case(gpu: &Gpu, case: &Case, variants: Variants, seed: u64, backward: bool) {
    run_case_as(gpu, case, variants, Storage::F32, seed, backward)
}

fn run_case_as(
    gpu: &Gpu,
    case: &Case,
    variants: Variants,
    storage: Storage,
    seed: u64,
    backward: bool,
) {
    run_biased(gpu, case, variants, storage, seed, backward, None);
}

/// One case against the reference; with `bias_std`, a random per-key bias of that spread.
fn run_biased(
    gpu: &Gpu,
    case: &Case,
    variants: Variants,
    storage: Storage,
    seed: u64,
    backward: bool,
    bias_std: Option<f64>,
) {
    let s = case.shape;
    let opts = AttnOptions::causal(case.causal);
    let mut rng = Rng::new(seed);
    let dt = storage.dtype();
    // What a tensor of dtype `dt` holds: the reference gets exactly that.
    let held = |x: Vec<f32>| if dt == DType::F16 { round_f16(&x) } else { x };
    let q = held(rng.normal_vec(s.q_len(), 1.0));
    let k = held(rng.normal_vec(s.kv_len(), 1.0));
    let v = held(rng.normal_vec(s.kv_len(), 1.0));
    let d_o = held(rng.normal_vec(s.q_len(), 1.0));
    let bias = bias_std.map(|std| rng.normal_vec(s.batch * s.heads_kv * s.seq_k, std));
    let tol = if dt == DType::F16 { TOL_F16 } else { TOL };
    let ctx = format!(
        "seed {seed}, {s:?}, causal {}, {} {}, bias std {bias_std:?}",
        case.causal,
        variants.name(),
        storage.name()
    );

    let att = FullAttention::new(
        gpu,
        s,
        &FullConfig::new(opts)
            .storage(storage)
            .variants(variants)
            .bias(bias.is_some()),
    )
    .expect(&ctx);
    let tb = bias
        .as_ref()
        .map(|b| gpu.upload(&[s.batch, s.heads_kv, s.seq_k], b).unwrap());
    let up = |dims: &[usize], x: &[f32]| gpu.upload_as(dims, x, dt).unwrap();
    let (tq, tk, tv) = (
        up(&s.q_dims(), &q),
        up(&s.kv_dims(), &k),
        up(&s.kv_dims(), &v),
    );
    let out = AttnOutput {
        o: up(&s.q_dims(), &vec![f32::NAN; s.q_len()]),
        lse: gpu
            .upload(&s.lse_dims(), &vec![f32::NAN; s.lse_len()])
            .unwrap(),
    };
    let x = Qkv::new(&tq, &tk, &tv).bias(tb.as_ref());
    let mut enc = gpu.encoder();
    att.encode_forward(gpu, &mut enc, x, &out).expect(&ctx);
    gpu.queue().submit([enc.finish()]);
    let want =
        reference::attention::forward_biased(&s, &opts, &q, &k, &v, bias.as_deref()).unwrap();
    let (go, gl) = (gpu.read(&out.o).unwrap(), gpu.read(&out.lse).unwrap());
    let eo = compare(&go, &want.o);
    let el = compare(&gl, &want.lse);
    let head = |x: &[f32]| {
        x.iter()
            .take(6)
            .map(|v| format!("{v:.4}"))
            .collect::<Vec<_>>()
    };
    assert!(
        eo.within(tol),
        "O: {eo:?} ({ctx}); got {:?}.., want {:?}..; LSE {el:?} got {:?}.., want {:?}..",
        head(&go),
        head(&want.o),
        head(&gl),
        head(&want.lse)
    );
    assert!(el.within(tol), "LSE: {el:?} ({ctx})");
    if !backward {
        return;
    }
    let tdo = up(&s.q_dims(), &d_o);
    let nb = s.batch * s.heads_kv * s.seq_k;
    let grads = sparse_attn::AttnGrads {
        dq: up(&s.q_dims(), &vec![f32::NAN; s.q_len()]),
        dk: up(&s.kv_dims(), &vec![f32::NAN; s.kv_len()]),
        dv: up(&s.kv_dims(), &vec![f32::NAN; s.kv_len()]),
        dbias: bias.as_ref().map(|_| {
            gpu.upload(&[s.batch, s.heads_kv, s.seq_k], &vec![f32::NAN; nb])
                .unwrap()
        }),
    };
    att.backward_into(gpu, x, &out, &tdo, &grads).expect(&ctx);
    let want = reference::attention::backward_biased(&s, &opts, &q, &k, &v, bias.as_deref(), &d_o)
        .unwrap();
    for (name, t, w) in [
        ("dQ", &grads.dq, &want.dq),
        ("dK", &grads.dk, &want.dk),
        ("dV", &grads.dv, &want.dv),
    ] {
        let e = compare(&gpu.read(t).unwrap(), w);
        assert!(e.within(tol), "{name}: {e:?} ({ctx})");
    }
    if let (Some(t), Some(w), Some(b)) = (&grads.dbias, &want.dbias, &bias) {
        // Against the size of its operands (its terms cancel: see common::dbias_error);
        // observed up to 1.3e-7 in f32 and 2e-5 with f16 storage.
        let off = s.q_offset();
        let sees = |_, _, i: usize, j: usize| !case.causal || j <= i + off;
        let got = gpu.read(t).unwrap();
        let e = common::dbias_error(
            &s,
            opts.scale_for(s.head_dim),
            (&q, &k, &v, b, &d_o),
            sees,
            &got,
            w,
        );
        assert!(e <= tol, "d bias: error {e:.3e} of the terms' size ({ctx})");
    }
}

fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    let sh = |b, hq, hkv, sq, sk, d| AttnShape {
        batch: b,
        heads_q: hq,
        heads_kv: hkv,
        seq_q: sq,
        seq_k: sk,
        head_dim: d,
    };
    for causal in [false, true] {
        v.push(Case {
            shape: sh(1, 1, 1, 1, 1, 32),
            causal,
        });
        v.push(Case {
            shape: sh(1, 4, 1, 17, 17, 64),
            causal,
        });
        v.push(Case {
            shape: sh(2, 2, 2, 63, 63, 32),
            causal,
        });
        v.push(Case {
            shape: sh(1, 2, 2, 64, 64, 128),
            causal,
        });
        v.push(Case {
            shape: sh(1, 4, 1, 65, 65, 64),
            causal,
        });
        v.push(Case {
            shape: sh(1, 2, 1, 200, 200, 32),
            causal,
        });
        v.push(Case {
            shape: sh(1, 4, 4, 33, 130, 64),
            causal,
        }); // seq_q < seq_k
        v.push(Case {
            shape: sh(1, 1, 1, 1, 77, 128),
            causal,
        }); // one decoding query
    }
    v.push(Case {
        shape: sh(1, 2, 1, 257, 257, 128),
        causal: true,
    });
    v.push(Case {
        shape: sh(1, 1, 1, 40, 90, 16),
        causal: false,
    });
    v.push(Case {
        shape: sh(1, 3, 1, 50, 50, 256),
        causal: true,
    });
    // a long causal sequence with GQA
    v.push(Case {
        shape: sh(1, 4, 2, 700, 700, 64),
        causal: true,
    });
    // head dims whose d/4 is not a multiple of 16 (fewer threads per row)
    v.push(Case {
        shape: sh(2, 2, 1, 45, 45, 48),
        causal: true,
    });
    v.push(Case {
        shape: sh(1, 2, 2, 70, 70, 80),
        causal: false,
    });
    v
}

fn variant_suite(variant: Variant) {
    let Some(gpu) = common::gpu() else { return };
    suite_on(&gpu, variant);
}

fn suite_on(gpu: &Gpu, variant: Variant) {
    suite_as(gpu, variant, Storage::F32)
}

/// f16 storage: native where the device has SHADER_F16 (lavapipe and the H100 do), and the
/// packed fallback that browsers without `shader-f16` get, which every device can run.
#[test]
fn f16_forward_and_backward_match_reference() {
    let Some(gpu) = common::gpu() else { return };
    if let Err(e) = Storage::F16.check(&gpu) {
        eprintln!("SKIPPED native f16 on {}: {e}", gpu.adapter().name);
    } else {
        suite_as(&gpu, Variant::Large, Storage::F16);
    }
}

/// Tensor cores: the cooperative-matrix forward (f16), with the f16 backward of the largest
/// tiles. Runs where the device has cooperative matrices (the H100 via scripts/gpu-check.sh).
#[test]
fn coop_forward_matches_reference() {
    let Some(gpu) = common::gpu() else { return };
    let seed = Rng::fresh_seed();
    let mut ran = 0;
    for (i, case) in cases().iter().enumerate() {
        let d = case.shape.head_dim;
        if let Err(e) = sparse_attn::ops::coop::supported(&gpu, d) {
            common::skip_coop(&gpu, &format!("coop d={d}"), false, &e);
            continue;
        }
        let variants = Variants {
            forward: Variant::Coop,
            backward: sparse_attn::ops::attention::auto_variants(&gpu, d)
                .unwrap()
                .backward,
        };
        let seed = seed.wrapping_add(i as u64);
        run_case_as(&gpu, case, variants, Storage::F16, seed, true);
        ran += 1;
    }
    eprintln!("coop: {ran} of {} cases ran", cases().len());
}

/// The backward on tensor cores too (dQ and dK/dV). Runs where the device has cooperative
/// matrices; skipped with the reason elsewhere.
#[test]
fn coop_backward_matches_reference() {
    let Some(gpu) = common::gpu() else { return };
    let seed = Rng::fresh_seed();
    let mut ran = 0;
    for (i, case) in cases().iter().enumerate() {
        let d = case.shape.head_dim;
        if let Err(e) = sparse_attn::ops::coop::supported(&gpu, d) {
            common::skip_coop(&gpu, &format!("coop backward d={d}"), false, &e);
            continue;
        }
        let variants = Variants {
            forward: Variant::Coop,
            backward: Variant::Coop,
        };
        run_case_as(
            &gpu,
            case,
            variants,
            Storage::F16,
            seed.wrapping_add(i as u64),
            true,
        );
        ran += 1;
    }
    eprintln!("coop backward: {ran} of {} cases ran", cases().len());
}

#[test]
fn f16_packed_forward_and_backward_match_reference() {
    let Some(gpu) = common::gpu() else { return };
    suite_as(&gpu, Variant::Portable, Storage::F16Packed);
}

fn suite_as(gpu: &Gpu, variant: Variant, storage: Storage) {
    let seed = Rng::fresh_seed();
    eprintln!("seed {seed}");
    let mut ran = 0;
    for (i, case) in cases().iter().enumerate() {
        let d = case.shape.head_dim;
        let sh = case.shape;
        // f16 changes only loads and stores: the long shapes add time on lavapipe, not coverage.
        if storage != Storage::F32 && sh.heads_q * sh.seq_q * sh.seq_k > 100_000 {
            continue;
        }
        if let Err(e) = sparse_attn::ops::attention::variant_supported(gpu, variant, d) {
            // GPU-only variants run in scripts/gpu-check.sh on a machine that has them.
            eprintln!(
                "SKIPPED {} d={d} on {}: {e}",
                variant.name(),
                gpu.adapter().name
            );
            continue;
        }
        run_case_as(
            gpu,
            case,
            Variants::uniform(variant),
            storage,
            seed.wrapping_add(i as u64),
            true,
        );
        ran += 1;
    }
    eprintln!(
        "{} {}: {ran} of {} cases ran",
        variant.name(),
        storage.name(),
        cases().len()
    );
}

#[test]
fn portable_forward_and_backward_match_reference() {
    variant_suite(Variant::Portable);
}

#[test]
fn large_forward_and_backward_match_reference() {
    variant_suite(Variant::Large);
}

#[test]
fn xl_forward_and_backward_match_reference() {
    variant_suite(Variant::Xl);
}

/// With WebGPU's default limits (what every browser grants) the portable variant is the one
/// chosen, and it is correct.
#[test]
fn portable_runs_within_webgpu_default_limits() {
    let Some(gpu) = common::gpu_with(&sparse_attn::GpuOptions {
        webgpu_default_limits: true,
        ..Default::default()
    }) else {
        return;
    };
    assert_eq!(gpu.limits().max_compute_workgroup_storage_size, 16384);
    assert_eq!(
        sparse_attn::ops::attention::auto_variants(&gpu, 128).unwrap(),
        sparse_attn::Variants::uniform(Variant::Portable)
    );
    suite_on(&gpu, Variant::Portable);
}

/// Forward and backward may use different variants (the automatic choice does on big GPUs).
#[test]
fn mixed_variants_match_reference() {
    let Some(gpu) = common::gpu() else { return };
    let seed = Rng::fresh_seed();
    let mixed = Variants {
        forward: Variant::Large,
        backward: Variant::Portable,
    };
    for (i, case) in cases().iter().enumerate().step_by(3) {
        if case.shape.head_dim > 128 {
            continue;
        }
        run_case(&gpu, case, mixed, seed.wrapping_add(i as u64), true);
    }
    // The automatic choice, whatever it is on this device.
    let auto = sparse_attn::ops::attention::auto_variants(&gpu, 64).unwrap();
    run_case(&gpu, &cases()[4], auto, seed, true);
}

/// The same WGSL through wgpu's GL backend (naga -> GLSL), where the machine has one (Mesa's
/// llvmpipe over EGL here). Not every machine has GL; none is a skip, not a failure.
#[test]
fn gl_backend_matches_reference_when_present() {
    let gpu = match Gpu::new(&sparse_attn::GpuOptions {
        adapter: Some("gl".into()),
        ..Default::default()
    }) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("SKIPPED: no GL adapter here ({e})");
            return;
        }
    };
    assert_eq!(gpu.adapter().backend, wgpu::Backend::Gl);
    let seed = Rng::fresh_seed();
    let auto = sparse_attn::ops::attention::auto_variants(&gpu, 64).unwrap();
    for (i, case) in cases().iter().enumerate().step_by(4) {
        if case.shape.head_dim == 64 || case.shape.head_dim == 32 {
            let v = sparse_attn::ops::attention::auto_variants(&gpu, case.shape.head_dim).unwrap();
            run_case(&gpu, case, v, seed.wrapping_add(i as u64), true);
        }
    }
    run_case(&gpu, &cases()[4], auto, seed, true);
}

/// An additive per-key bias (NOSA's eviction score), forward and backward with d bias, on every
/// portable-arithmetic variant; every other case with a bias of large magnitude (std 30, logits
/// dominated by it). f16 storage on the smaller cases. The portable variant takes every case;
/// the larger tiles (whose unbiased kernels take every case in their own tests) a third of them
/// and the head dims split over 4 threads or fewer, outside scripts/gpu-check.sh: each biased
/// tile and head dim is another compilation, seconds each on lavapipe.
#[test]
fn biased_forward_and_backward_match_reference() {
    let Some(gpu) = common::gpu() else { return };
    let seed = Rng::fresh_seed();
    eprintln!("seed {seed}");
    for variant in Variant::ALL {
        for (i, case) in cases().iter().enumerate() {
            let d = case.shape.head_dim;
            let sampled = i % 3 == 0 || [16, 48].contains(&d);
            if variant != Variant::Portable && !sampled && !common::gpu_check() {
                continue;
            }
            if let Err(e) = sparse_attn::ops::attention::variant_supported(&gpu, variant, d) {
                eprintln!("SKIPPED {} d={d}: {e}", variant.name());
                continue;
            }
            let std = if i % 2 == 0 { 2.0 } else { 30.0 };
            let v = Variants::uniform(variant);
            let seed = seed.wrapping_add(i as u64);
            run_biased(&gpu, case, v, Storage::F32, seed, true, Some(std));
            let sh = case.shape;
            // f16 with the moderate bias only: with a dominant key, dS = P (dP - D) cancels and
            // D comes from the f16-rounded O, so the error grows past f16's tolerance (3e-3
            // observed at std 30), as in any f16 attention backward.
            if variant == Variant::Large
                && std < 10.0
                && sh.heads_q * sh.seq_q * sh.seq_k <= 100_000
                && Storage::F16.check(&gpu).is_ok()
            {
                run_biased(&gpu, case, v, Storage::F16, seed, true, Some(std));
            }
        }
    }
}

/// A bias of zeros changes nothing beyond rounding: fma(s, scale, 0) is the product itself, but
/// a compiler may fuse the unbiased kernel's product into the next subtraction (NVIDIA's does:
/// dQ differed in the last bits on the H200), so the bound is 1e-6 relative, not bit equality;
/// a misplaced bias, or d bias leaking into another gradient, is far above it.
#[test]
fn zero_bias_equals_no_bias() {
    let Some(gpu) = common::gpu() else { return };
    let s = AttnShape::new(1, 4, 2, 77, 64);
    let mut rng = Rng::new(Rng::fresh_seed());
    let t = |dims: &[usize], rng: &mut Rng| {
        gpu.upload(dims, &rng.normal_vec(dims.iter().product(), 1.0))
            .unwrap()
    };
    let (q, k, v, d_o) = (
        t(&s.q_dims(), &mut rng),
        t(&s.kv_dims(), &mut rng),
        t(&s.kv_dims(), &mut rng),
        t(&s.q_dims(), &mut rng),
    );
    let zeros = gpu.upload(&[1, 2, 77], &vec![0.0; 2 * 77]).unwrap();
    let run = |bias: Option<&sparse_attn::Tensor>| {
        let att = FullAttention::new(
            &gpu,
            s,
            &FullConfig::new(AttnOptions::causal(true)).bias(bias.is_some()),
        )
        .unwrap();
        let x = Qkv::new(&q, &k, &v).bias(bias);
        let out = AttnOutput::empty(&gpu, &s).unwrap();
        let grads =
            sparse_attn::AttnGrads::empty_with(&gpu, &s, DType::F32, bias.is_some()).unwrap();
        let mut enc = gpu.encoder();
        att.encode_forward(&gpu, &mut enc, x, &out).unwrap();
        att.encode_backward(&gpu, &mut enc, x, &out, &d_o, &grads)
            .unwrap();
        gpu.queue().submit([enc.finish()]);
        [&out.o, &out.lse, &grads.dq, &grads.dk, &grads.dv].map(|t| gpu.read(t).unwrap())
    };
    let (a, b) = (run(None), run(Some(&zeros)));
    for (n, (x, y)) in ["O", "LSE", "dQ", "dK", "dV"].iter().zip(a.iter().zip(&b)) {
        let e = compare(x, y);
        assert!(e.within(1e-6), "{n} differs with a zero bias: {e:?}");
    }
}

/// The tensor-core kernels take no bias: asked for explicitly with one, an error that says so;
/// left to choose, f16 with a bias runs the portable-arithmetic kernels.
#[test]
fn bias_with_tensor_cores_is_refused_or_avoided() {
    let Some(gpu) = common::gpu() else { return };
    let s = AttnShape::new(1, 2, 1, 40, 64);
    let o = AttnOptions::causal(true);
    let e = FullAttention::new(
        &gpu,
        s,
        &FullConfig::new(o)
            .dtype(DType::F16)
            .variant(Variant::Coop)
            .bias(true),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("bias") || e.contains("cooperative"), "{e}");
    if Storage::F16.check(&gpu).is_ok() {
        let att =
            FullAttention::new(&gpu, s, &FullConfig::new(o).dtype(DType::F16).bias(true)).unwrap();
        assert_ne!(att.variants().forward, Variant::Coop);
        assert_ne!(att.variants().backward, Variant::Coop);
    }
    // A bias given to an op built without one, and the other way round.
    let att = FullAttention::new(&gpu, s, &FullConfig::new(o)).unwrap();
    let z = |dims: &[usize]| gpu.upload(dims, &vec![0.0; dims.iter().product()]).unwrap();
    let (q, k, v, b) = (
        z(&s.q_dims()),
        z(&s.kv_dims()),
        z(&s.kv_dims()),
        z(&[1, 1, 40]),
    );
    let out = AttnOutput::empty(&gpu, &s).unwrap();
    let mut enc = gpu.encoder();
    let e = att
        .encode_forward(&gpu, &mut enc, Qkv::new(&q, &k, &v).bias(Some(&b)), &out)
        .unwrap_err();
    assert!(e.to_string().contains("without one"), "{e}");
    let att = FullAttention::new(&gpu, s, &FullConfig::new(o).bias(true)).unwrap();
    let e = att
        .encode_forward(&gpu, &mut enc, Qkv::new(&q, &k, &v), &out)
        .unwrap_err();
    assert!(e.to_string().contains("none was given"), "{e}");
    let wrong = z(&[1, 1, 39]);
    let e = att
        .encode_forward(
            &gpu,
            &mut enc,
            Qkv::new(&q, &k, &v).bias(Some(&wrong)),
            &out,
        )
        .unwrap_err();
    assert!(e.to_string().contains("bias"), "{e}");
}
