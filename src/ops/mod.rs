//! One module per kernel family: validates shapes, picks the variant the device supports, owns
//! bind layouts and dispatch math; everything returns `Result`.

pub mod align;
pub mod attention;
pub mod coop;
pub(crate) mod launch;
pub mod llama;
pub mod metrics;
pub(crate) mod rowdot;
pub mod select;
pub mod sparse;
pub(crate) mod tiles;
