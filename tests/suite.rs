//! Every integration test in one test binary (`cargo test --test suite`, filter by module:
//! `cargo test --features train --test suite -- sparse::`). One binary instead of one per file:
//! the library and Burn's generic code are instantiated and linked once, not nineteen times,
//! which was most of CI's build time on two cores; the modules' tests also share the test
//! threads instead of running file after file.

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
