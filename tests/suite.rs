//! Every integration test in one test binary (`cargo test --test suite`, filter by module:
//! `cargo test --features train --test suite -- sparse::`). One binary instead of one per file:
//! the library and Burn's generic code are instantiated and linked once, not nineteen times
//! (92 s of CPU -> 43 s in a cold build on two cores), and the modules' tests share the test
//! threads instead of one long test leaving the other thread of its binary idle.

mod common;

mod align;
mod attention;
mod bad_input;
// The CLI as a user runs it: needs the `sparse-attn` program, which needs the `cli` feature.
#[cfg(feature = "cli")]
mod cli;
mod decode;
mod explore;
mod generate;
mod gguf;
mod llama;
mod metrics;
mod model;
mod offload;
mod properties;
mod runtime;
mod select;
mod sparse;
mod tokenizer;
mod train;
mod train_ops;
