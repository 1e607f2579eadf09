//! Training with SSA in Burn: our kernels as differentiable Burn ops on a device shared with
//! Burn's wgpu backend (`bridge`, `ops`), a small Llama-style LM (`model`), byte-level data with
//! a pass-key task (`data`), and the training loop with checkpoints (`trainer`).

mod autodiff;
pub mod bridge;
pub mod checkpoint;
pub mod data;
pub mod eval;
pub mod generate;
pub mod llama;
pub mod model;
pub mod ops;
pub mod scale;
pub mod sweep;
pub mod trainer;

pub use bridge::{Runtime, gpu_for};
pub use model::{Lm, LmConfig, Mode, Precision};
pub use ops::{
    AttnBackend, align_loss, attention, attention_metrics, select_blocks, sparse_attention,
};
pub use trainer::{TrainConfig, train};
