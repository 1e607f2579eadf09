//! Decoding: attention of a few new query tokens against a KV cache (`attention`, flash-decoding
//! split over the keys, full or over a block selection, with NOSA's per-key bias), the cache
//! (`cache`), NOSA's offloaded cache (`offload`), and one layer's step over them (`layer`).
//! Problem types: `problem::DecodeShape`, `problem::DecodeKeys`; reference: `reference::decode`.

pub mod attention;
pub mod cache;
pub mod layer;
pub mod offload;

pub use attention::{DecodeAttention, DecodeConfig, DecodeInputs};
pub use cache::{CacheConfig, KvCache};
pub use layer::{DecodeLayer, LayerConfig};
pub use offload::{OffloadCache, OffloadConfig, OffloadPath, OffloadStats};
