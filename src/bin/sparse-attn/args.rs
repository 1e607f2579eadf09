//! Flags several commands share: problem shapes, block selection, dtypes and kernels.

use clap::{Args, ValueEnum};
use sparse_attn::ops::sparse::SparseKernel;
use sparse_attn::problem::{AttnShape, Scoring, SelectOptions};
use sparse_attn::{DType, Error};

#[derive(Clone, Copy, ValueEnum, PartialEq)]
pub enum Mask {
    Causal,
    Full,
    Both,
}

/// Problem shapes of a benchmark sweep.
#[derive(Args)]
pub struct ShapeArgs {
    /// Batch size; default fills the GPU: max(1, 65536 / seq).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Query heads.
    #[arg(long, default_value_t = 16)]
    pub heads: usize,
    /// Key/value heads (GQA); default = heads.
    #[arg(long)]
    pub kv_heads: Option<usize>,
    /// Sequence lengths (comma-separated list runs a sweep).
    #[arg(long, value_delimiter = ',', default_values_t = vec![4096])]
    pub seq: Vec<usize>,
    /// Head dims (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = vec![128])]
    pub head_dim: Vec<usize>,
}

impl ShapeArgs {
    pub fn shape(&self, seq: usize, d: usize) -> AttnShape {
        AttnShape::new(
            self.batch.unwrap_or((65536 / seq.max(1)).max(1)),
            self.heads,
            self.kv_heads.unwrap_or(self.heads),
            seq,
            d,
        )
    }
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
pub enum ScoringArg {
    Ssa,
    Moba,
    InfllmV2,
}

/// How blocks are selected.
#[derive(Args)]
pub struct SelectArgs {
    /// Block size B (16, 32, 64, 128).
    #[arg(long, default_value_t = 16)]
    pub block: usize,
    /// Blocks kept per token and kv head (k), forced ones included.
    #[arg(long, default_value_t = 16)]
    pub topk: usize,
    /// Forced initial blocks.
    #[arg(long, default_value_t = 0)]
    pub n_init: usize,
    /// Forced local blocks before the current one.
    #[arg(long, default_value_t = 0)]
    pub n_local: usize,
    #[arg(long, value_enum, default_value_t = ScoringArg::Ssa)]
    pub scoring: ScoringArg,
    /// NOSA's selection: blocks chosen by the query besides the forced ones; the rest of
    /// --topk is chosen by a query-agnostic eviction score (NOSA.md §2).
    #[arg(long)]
    pub k_query: Option<usize>,
}

impl SelectArgs {
    pub fn options(&self) -> Result<SelectOptions, Error> {
        let plain = SelectOptions {
            block: self.block,
            k: self.topk,
            n_init: self.n_init,
            n_local: self.n_local,
            scoring: match self.scoring {
                ScoringArg::Ssa => Scoring::Ssa,
                ScoringArg::Moba => Scoring::Moba,
                ScoringArg::InfllmV2 => Scoring::InfLlmV2,
            },
            causal: true,
            scale: None,
            evict: 0,
        };
        Ok(match self.k_query {
            None => plain,
            Some(kq) => SelectOptions {
                scoring: plain.scoring,
                ..SelectOptions::nosa_budget(self.block, self.topk, self.n_init, self.n_local, kq)?
            },
        })
    }
}

/// `f32` or `f16`.
pub fn parse_dtype(s: &str) -> Result<DType, Error> {
    match s {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        _ => Err(Error::InvalidInput(format!(
            "unknown dtype `{s}` (known: f32, f16)"
        ))),
    }
}

pub fn parse_kernel(s: &str) -> Result<SparseKernel, Error> {
    match s {
        "auto" => Ok(SparseKernel::Auto),
        "portable" => Ok(SparseKernel::Portable),
        "coop" => Ok(SparseKernel::Coop),
        _ => Err(Error::InvalidInput(format!(
            "unknown sparse kernel `{s}` (known: auto, portable, coop)"
        ))),
    }
}
