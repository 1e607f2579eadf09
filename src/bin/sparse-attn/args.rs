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
        "rows" => Ok(SparseKernel::Rows),
        _ => Err(Error::InvalidInput(format!(
            "unknown sparse kernel `{s}` (known: auto, portable, coop, rows)"
        ))),
    }
}

/// A pretrained model and the held-out text it is measured on (`perplexity`, `bench generate`).
#[cfg(feature = "train")]
#[derive(Args)]
pub struct GgufText {
    /// A Llama-family model in a GGUF file (scripts/fetch-model.sh fetches SmolLM2-135M).
    #[arg(long)]
    pub gguf: std::path::PathBuf,
    /// Folder of .txt files; every --valid-every-th file (sorted, from the first) is held out
    /// (the same split as `train` and `eval`) and gives the text measured or the prompts.
    #[arg(long, default_value = "data/shakespeare")]
    pub data: std::path::PathBuf,
    #[arg(long, default_value_t = 10)]
    pub valid_every: usize,
}

#[cfg(feature = "train")]
impl GgufText {
    /// The text, read before any GPU work so that a wrong folder fails first.
    pub fn corpus(&self) -> Result<sparse_attn::train::data::Corpus, Error> {
        sparse_attn::train::data::Corpus::load(&self.data, self.valid_every)
    }

    /// The model on `device`, and the held-out text in its tokens.
    pub fn load(
        &self,
        corpus: &sparse_attn::train::data::Corpus,
        device: &burn::tensor::Device,
        sparse: sparse_attn::train::llama::SparseSettings,
    ) -> Result<(sparse_attn::train::llama::Pretrained, Vec<u32>), Error> {
        let p = sparse_attn::train::llama::Pretrained::load(&self.gguf, device, sparse)?;
        let tokens = p
            .tokenizer
            .encode(&String::from_utf8_lossy(&corpus.valid))?;
        eprintln!(
            "{}: {} held-out tokens ({} files, {} bytes)",
            self.gguf.display(),
            tokens.len(),
            corpus.valid_files.len(),
            corpus.valid.len()
        );
        Ok((p, tokens))
    }

    /// The model file's name, for records.
    pub fn model_name(&self) -> Option<String> {
        self.gguf
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
    }
}
