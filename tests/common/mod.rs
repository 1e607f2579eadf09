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
