//! # sparse-attn
//!
//! Trainable sparse attention (SSA, NOSA) on any GPU through WebGPU: WGSL compute kernels, a thin
//! wgpu runtime, and a plain-Rust f64 reference beside every kernel.
//!
//! ```no_run
//! use sparse_attn::{Gpu, GpuOptions, AttnOptions, attention_forward};
//! # fn main() -> sparse_attn::Result<()> {
//! let gpu = Gpu::new(&GpuOptions::default())?;
//! let data = vec![0.1f32; 2 * 64 * 32];
//! let q = gpu.upload(&[1, 2, 64, 32], &data)?;
//! let k = gpu.upload(&[1, 2, 64, 32], &data)?;
//! let v = gpu.upload(&[1, 2, 64, 32], &data)?;
//! let out = attention_forward(&gpu, &q, &k, &v, &AttnOptions::causal(true))?;
//! let o = gpu.read(&out.o)?;
//! # Ok(()) }
//! ```

pub mod decode;
pub mod error;
pub mod explore;
pub mod files;
pub mod gguf;
pub mod gpu;
pub mod llama;
pub mod npy;
pub mod ops;
pub mod problem;
pub mod reference;
pub mod safetensors;
pub mod selfcheck;
pub mod synthetic;
#[cfg(feature = "llm")]
pub mod tokenizer;
#[cfg(all(feature = "train", not(target_arch = "wasm32")))]
pub mod train;
/// PNG pictures (attention maps, plots): feature `png` (on with `cli` and `train`).
#[cfg(feature = "png")]
pub mod viz;

pub use decode::{CacheConfig, DecodeAttention, DecodeConfig, DecodeInputs, KvCache};
pub use error::{Error, Result};
pub use gpu::{DType, Gpu, GpuOptions, Tensor};
pub use ops::attention::{
    AttnGrads, AttnOutput, FullAttention, FullConfig, Qkv, Variant, Variants, attention_backward,
    attention_forward,
};
pub use ops::select::{BlockSelect, ScoreKernel, SelectConfig, SelectInputs, TopK};
pub use ops::sparse::{SparseAttention, SparseConfig, SparseInputs, SparseKernel};
pub use problem::{
    AttnOptions, AttnShape, CacheShape, DecodeKeys, DecodeShape, Scoring, SelectOptions,
    SparseOptions,
};
/// The wgpu this crate is built on, for callers that record into their own encoders.
pub use wgpu;
