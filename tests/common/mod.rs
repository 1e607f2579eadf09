//! Helpers shared by the integration tests.
#![allow(dead_code)]

use sparse_attn::{Gpu, GpuOptions};

/// The test GPU. Tests fail without one unless SPARSE_ATTN_ALLOW_NO_GPU=1 (then they are
/// skipped with a printed reason): a CI run that silently tests nothing must not pass.
pub fn gpu() -> Option<Gpu> {
    gpu_with(&GpuOptions::default())
}

pub fn gpu_with(opts: &GpuOptions) -> Option<Gpu> {
    match Gpu::new(opts) {
        Ok(g) => {
            eprintln!("adapter: {}", g.adapter());
            Some(g)
        }
        Err(e) if std::env::var("SPARSE_ATTN_ALLOW_NO_GPU").as_deref() == Ok("1") => {
            eprintln!("skipping GPU test: {e}");
            None
        }
        Err(e) => panic!("{e}\n(set SPARSE_ATTN_ALLOW_NO_GPU=1 to skip GPU tests)"),
    }
}

/// One Burn runtime on the test GPU, shared by every test of a binary (a device is registered
/// with Burn once). `None` where `gpu` skips.
#[cfg(feature = "train")]
pub fn burn_runtime() -> Option<sparse_attn::train::Runtime> {
    use sparse_attn::train::Runtime;
    static RT: std::sync::OnceLock<Option<Runtime>> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        let gpu = gpu_with(&Runtime::gpu_options(&GpuOptions::default()))?;
        Some(Runtime::from_gpu(std::sync::Arc::new(gpu)).expect("Burn shares our device"))
    })
    .clone()
}

/// A tensor-core (cooperative-matrix) case the device or shape cannot run: skipped with its
/// reason. Under scripts/gpu-check.sh (SPARSE_ATTN_GPU_CHECK=1) on a device that has
/// cooperative matrices a skip fails the test instead, unless `by_shape` (the case asks for
/// what the kernel declines on every device, e.g. more than 16 query heads per kv head): a
/// broken support check must not let the tensor-core path pass untested.
pub fn skip_coop(gpu: &Gpu, what: &str, by_shape: bool, reason: &dyn std::fmt::Display) {
    let has = gpu
        .features()
        .contains(sparse_attn::wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX);
    if has && !by_shape && std::env::var("SPARSE_ATTN_GPU_CHECK").as_deref() == Ok("1") {
        panic!(
            "{what} was skipped on {}, which has cooperative matrices: {reason}",
            gpu.adapter().name
        );
    }
    eprintln!("SKIPPED {what} on {}: {reason}", gpu.adapter().name);
}
