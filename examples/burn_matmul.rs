//! Burn's matmuls at the training model's shapes on the device we share with Burn (issue 20,
//! points 2-3): f32 and f16, forward Y = X·W and the two backward products (dX = dY·Wᵀ and
//! dW = Xᵀ·dY over a batch of sequences), timed as Burn runs them in training (one sync after
//! a batch of repetitions). With the `burn-vulkan` feature the device comes from CubeCL's
//! Vulkan helper and Burn compiles SPIR-V, with cooperative-matrix matmuls where the operand
//! types allow; without it, WGSL.
//!
//!     cargo run --release --example burn_matmul [--features burn-vulkan] [TOKENS]

use burn::tensor::{DType, Distribution, Tensor};
use sparse_attn::GpuOptions;
use sparse_attn::train::Runtime;
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let tokens: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(32768);
    let rt = Runtime::new(&GpuOptions::default())?;
    println!("device: {}", rt.gpu.adapter());
    let dev = &rt.device;
    let b = 16.min(tokens);
    let t = tokens / b;
    // (what, in, out): the model's projections (d_model 384, 2 kv heads of 48, d_ff 1024).
    let shapes = [
        ("q / o proj", 384, 384),
        ("k, v proj", 384, 96),
        ("mlp up / gate", 384, 1024),
        ("mlp down", 1024, 384),
    ];
    println!("tokens {tokens} (batch {b} x {t}); ms per product, TFLOP/s");
    println!("| shape | dtype | Y = X·W | dX = dY·Wᵀ | dW = Xᵀ·dY (summed over the batch) |");
    println!("| --- | --- | --- | --- | --- |");
    for (what, k, n) in shapes {
        for dtype in [DType::F32, DType::F16] {
            let x = Tensor::<3>::random([b, t, k], Distribution::Normal(0.0, 1.0), dev).cast(dtype);
            let w = Tensor::<3>::random([1, k, n], Distribution::Normal(0.0, 1.0), dev).cast(dtype);
            let dy =
                Tensor::<3>::random([b, t, n], Distribution::Normal(0.0, 1.0), dev).cast(dtype);
            let flops = 2.0 * (b * t * k * n) as f64;
            let time = |f: &dyn Fn() -> Tensor<3>| -> f64 {
                // Warm-up (autotune, compilation), then repetitions filling ~0.3 s.
                let _ = f().into_data();
                let mut reps = 1;
                loop {
                    let t0 = Instant::now();
                    let mut last = None;
                    for _ in 0..reps {
                        last = Some(f());
                    }
                    let _ = last.map(|y| y.slice([0..1, 0..1, 0..1]).into_data());
                    let s = t0.elapsed().as_secs_f64();
                    if s > 0.3 || reps >= 1024 {
                        return s / reps as f64;
                    }
                    reps *= 4;
                }
            };
            let fwd = time(&|| x.clone().matmul(w.clone()));
            let dx = time(&|| dy.clone().matmul(w.clone().swap_dims(1, 2)));
            let dw = time(&|| x.clone().swap_dims(1, 2).matmul(dy.clone()).sum_dim(0));
            let cell = |s: f64| format!("{:.3} ms, {:.1}", s * 1e3, flops / s / 1e12);
            println!(
                "| {what} ({k} -> {n}) | {dtype:?} | {} | {} | {} |",
                cell(fwd),
                cell(dx),
                cell(dw)
            );
        }
    }
    Ok(())
}
