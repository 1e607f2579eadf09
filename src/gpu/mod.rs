//! The thin runtime: device, tensors, pipelines, timing.

mod device;
pub(crate) mod encoder;
pub(crate) mod pipeline;
#[cfg(not(target_arch = "wasm32"))]
pub mod stats;
pub(crate) mod tensor;
mod timer;
pub(crate) mod uniform;

#[cfg(not(target_arch = "wasm32"))]
pub use device::list_adapters;
pub use device::{
    ADAPTER_ENV, AdapterSummary, Gpu, GpuOptions, OPTIONAL_FEATURES, adapter_matches, rank_adapters,
};
pub use encoder::Encoder;
pub use pipeline::{Pipeline, PipelineKey, Storage, preprocess};
pub use tensor::{DType, Tensor, from_f16_bits, round_f16, to_f16_bits};
pub use timer::{ProfileEvent, Reps, TimerSource, Timing};
#[cfg(all(feature = "train", not(target_arch = "wasm32")))]
pub(crate) use timer::{by_kernel, sum_by_label};
