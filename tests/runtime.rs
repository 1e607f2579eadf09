//! The runtime pieces: GPU random fill (used by benchmarks) and the timer.

mod common;

use sparse_attn::GpuOptions;
use sparse_attn::gpu::Reps;

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
}

#[test]
fn timer_measures_positive_times_and_rejects_zero_reps() {
    let Some(gpu) = common::gpu() else { return };
    let t = gpu.random_uniform(&[1 << 16], 1, 1.0).unwrap();
    let u = gpu.empty(&[1 << 16], sparse_attn::DType::F32).unwrap();
    let copy = |enc: &mut wgpu::CommandEncoder| {
        enc.copy_buffer_to_buffer(t.buffer(), 0, u.buffer(), 0, t.size_bytes());
        Ok(())
    };
    let r = gpu.time(Reps::Fixed(5), copy).unwrap();
    assert_eq!(r.reps, 5);
    assert!(r.seconds > 0.0 && r.seconds < 1.0, "{r:?}");
    assert!(gpu.time(Reps::Fixed(0), copy).is_err());
}
