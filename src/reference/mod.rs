//! Plain-Rust f64 versions of every op: the ground truth of the tests.

pub mod align;
pub mod attention;
pub mod decode;
pub mod llama;
pub mod metrics;
mod rng;
pub mod select;
pub mod sparse;
mod stats;

pub use rng::Rng;
pub use stats::{ErrorStats, compare};
