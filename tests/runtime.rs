//! The runtime pieces: GPU random fill (used by benchmarks) and the timer.

use crate::common;

use sparse_attn::FullConfig;
use sparse_attn::GpuOptions;
use sparse_attn::Qkv;
use sparse_attn::gpu::{DType, Reps, round_f16};

#[test]
fn random_fill_is_uniform_reproducible_and_covers_split_tensors() {
    // A 64 KiB binding limit forces the fill to split a 160 KiB tensor into several launches.
    let Some(gpu) = common::gpu_with(&GpuOptions {
        max_storage_binding: Some(64 * 1024),
        ..Default::default()
    }) else {
        return;
    };
    let n = 40_000;
    let a = gpu
        .read(&gpu.random_uniform(&[n], 7, 2.0).unwrap())
        .unwrap();
    let b = gpu
        .read(&gpu.random_uniform(&[n], 7, 2.0).unwrap())
        .unwrap();
    let c = gpu
        .read(&gpu.random_uniform(&[n], 8, 2.0).unwrap())
        .unwrap();
    assert_eq!(a, b, "same seed, same values");
    assert_ne!(a, c, "another seed, other values");
    assert!(a.iter().all(|x| (-2.0..2.0).contains(x)));
    // Unwritten elements would stay 0: with 24-bit uniforms exact zeros are ~never drawn.
    assert!(a.iter().filter(|&&x| x == 0.0).count() < 3);
    let mean = a.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
    let var = a.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n as f64;
    assert!(mean.abs() < 0.05, "mean {mean}");
    assert!((var - 4.0 / 3.0).abs() < 0.05, "variance {var}");
    // The tail of the last launch is filled too.
    assert!(a[n - 100..].iter().any(|&x| x != 0.0));

    // f16: the same values rounded, an odd length, split the same way.
    let m = 40_001;
    let f = gpu
        .read(&gpu.random_uniform_as(&[m], 7, 2.0, DType::F16).unwrap())
        .unwrap();
    let full = gpu
        .read(&gpu.random_uniform(&[m], 7, 2.0).unwrap())
        .unwrap();
    assert_eq!(f, round_f16(&full));
}

#[test]
fn f16_tensors_round_trip_and_reject_wrong_use() {
    let Some(gpu) = common::gpu() else { return };
    // Odd length: the last element shares its word with the buffer's pad.
    let x: Vec<f32> = (0..7).map(|i| i as f32 * 0.3 - 1.0).collect();
    let t = gpu.upload_f16(&[7], &x).unwrap();
    assert_eq!(t.size_bytes(), 14);
    assert_eq!(gpu.read(&t).unwrap(), round_f16(&x));
    let y: Vec<f32> = x.iter().map(|v| v * 2.0 + 1e5).collect();
    gpu.write(&t, &y).unwrap();
    // Beyond the f16 range: infinity, like any f16 conversion.
    assert!(gpu.read(&t).unwrap().iter().all(|v| v.is_infinite()));
    gpu.fill(&t, f32::NAN).unwrap();
    assert!(gpu.read(&t).unwrap().iter().all(|v| v.is_nan()));
    assert!(gpu.read_u32(&t).is_err());
    assert!(gpu.upload_as(&[2], &[1.0, 2.0], DType::U32).is_err());
    assert!(gpu.upload_f16(&[3], &[1.0]).is_err());
}

#[test]
fn timer_measures_positive_times_and_rejects_zero_reps() {
    let Some(gpu) = common::gpu() else { return };
    let t = gpu.random_uniform(&[1 << 16], 1, 1.0).unwrap();
    let u = gpu.empty(&[1 << 16], sparse_attn::DType::F32).unwrap();
    let copy = |enc: &mut sparse_attn::gpu::Encoder| {
        enc.raw()
            .copy_buffer_to_buffer(t.buffer(), 0, u.buffer(), 0, t.size_bytes());
        Ok(())
    };
    let r = gpu.time(Reps::Fixed(5), copy).unwrap();
    assert_eq!(r.reps, 5);
    assert!(r.seconds > 0.0 && r.seconds < 1.0, "{r:?}");
    assert!(gpu.time(Reps::Fixed(0), copy).is_err());
}

/// `Gpu::profile` times each dispatch and names it by kernel; outside a profile, dispatches
/// carry no timestamps (the profiler is off again afterwards).
#[test]
fn profile_names_every_kernel_of_a_pass() {
    let Some(gpu) = common::gpu() else { return };
    let shape = sparse_attn::AttnShape::new(1, 2, 1, 40, 16);
    let att = sparse_attn::FullAttention::new(
        &gpu,
        shape,
        &FullConfig::new(sparse_attn::AttnOptions::causal(true)),
    )
    .unwrap();
    let q = gpu.random_uniform(&shape.q_dims(), 1, 1.0).unwrap();
    let k = gpu.random_uniform(&shape.kv_dims(), 2, 1.0).unwrap();
    let v = gpu.random_uniform(&shape.kv_dims(), 3, 1.0).unwrap();
    let d_o = gpu.random_uniform(&shape.q_dims(), 4, 1.0).unwrap();
    let out = att.forward(&gpu, &q, &k, &v).unwrap();
    let grads = sparse_attn::ops::attention::AttnGrads::empty(&gpu, &shape).unwrap();
    let bwd = |enc: &mut sparse_attn::gpu::Encoder| {
        att.encode_backward(&gpu, enc, Qkv::new(&q, &k, &v), &out, &d_o, &grads)
    };
    if !gpu.has_timestamps() {
        let e = gpu.profile(2, bwd).unwrap_err();
        assert!(e.to_string().contains("timestamp"), "{e}");
        return;
    }
    let p = gpu.profile(3, bwd).unwrap();
    let names: Vec<&str> = p.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(
        names,
        [
            "rowdot.wgsl:main",
            "attention_bwd.wgsl:dkdv",
            "attention_bwd.wgsl:dq_main"
        ],
        "{p:?}"
    );
    for (name, secs, n) in &p {
        assert!(*secs > 0.0 && *secs < 1.0, "{name}: {secs}");
        assert_eq!(*n, 1, "{name}: one dispatch per pass");
    }
    // The profiler is off again: plain timing still works and sees no profile slots.
    assert!(gpu.time(Reps::Fixed(2), bwd).unwrap().seconds > 0.0);
}

/// `#N` in an adapter filter takes the N-th adapter the other terms match (one of several
/// identical GPUs); an index past them, or one that is not a number, is an error.
#[test]
fn adapter_index_picks_among_matching_adapters() {
    if common::gpu().is_none() {
        return;
    }
    let open = |f: &str| {
        sparse_attn::Gpu::new(&sparse_attn::GpuOptions {
            adapter: Some(f.into()),
            ..Default::default()
        })
    };
    let first = open("#0").unwrap();
    let n = sparse_attn::gpu::list_adapters().len();
    assert_eq!(
        first.adapter().name,
        open("").unwrap().adapter().name,
        "#0 is the default choice"
    );
    let e = open(&format!("#{n}")).unwrap_err().to_string();
    assert!(e.contains("no GPU adapter"), "{e}");
    let e = open("#one").unwrap_err().to_string();
    assert!(e.contains("not an index"), "{e}");
}
