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
