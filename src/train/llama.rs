//! Pretrained Llama-family models from GGUF files (SmolLM2 and its relatives) as an [`Lm`]:
//! the weights dequantised to f32, the architecture from the file (no output gate, no eviction
//! head, the file's RMSNorm epsilon and RoPE base, a tied or separate output head), the
//! tokenizer from its metadata. Attention then runs our kernels in every mode the model
//! supports without training: full, block-sparse with any scoring, decoding with the KV cache
//! on the GPU or offloaded.
//!
//! GGUF stores a 2-D weight innermost dim first: `[d_in, d_out]` is d_out rows of d_in values
//! (PyTorch's `[out, in]`); Burn's `Linear` wants `[d_in, d_out]`, so each is transposed here.
//! llama.cpp's converter permutes q and k so that RoPE rotates adjacent pairs, which is what
//! Burn's `RotaryEncoding` does: the file's weights are used as they are.

use burn::module::Param;
use burn::nn::{Embedding, Linear, RmsNorm};
use burn::tensor::{Device, Tensor, TensorData};

use crate::error::{Error, Result, invalid};
use crate::gguf::{Gguf, LlamaParams};
use crate::problem::Scoring;
use crate::tokenizer::Tokenizer;
use crate::train::model::{Layer, Lm, LmConfig};

/// Sparse-attention settings for a pretrained model (they are not in its file).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SparseSettings {
    pub block: usize,
    /// Blocks per query (receptive field = block · topk).
    pub topk: usize,
    pub scoring: Scoring,
    pub n_init: usize,
    pub n_local: usize,
}

impl Default for SparseSettings {
    /// Blocks of 64, 16 per query (a receptive field of 1024 tokens), InfLLM-V2 scoring with
    /// the first block and two local blocks always kept.
    fn default() -> Self {
        Self {
            block: 64,
            topk: 16,
            scoring: Scoring::InfLlmV2,
            n_init: 1,
            n_local: 2,
        }
    }
}

/// A model loaded from a GGUF file.
pub struct Pretrained {
    pub model: Lm,
    pub config: LmConfig,
    pub tokenizer: Tokenizer,
    pub params: LlamaParams,
}

impl Pretrained {
    /// Reads the model in `path` (see [`Self::from_bytes`]).
    pub fn load(path: &std::path::Path, device: &Device, sparse: SparseSettings) -> Result<Self> {
        let bytes = std::fs::read(path)
            .map_err(|e| Error::InvalidInput(format!("reading {}: {e}", path.display())))?;
        Self::from_bytes(&bytes, device, sparse)
            .map_err(|e| Error::InvalidInput(format!("{}: {e}", path.display())))
    }

    /// The model in the GGUF file `bytes`, its weights on `device`.
    pub fn from_bytes(bytes: &[u8], device: &Device, sparse: SparseSettings) -> Result<Self> {
        let g = Gguf::parse(bytes)?;
        let p = LlamaParams::from_gguf(&g)?;
        let tokenizer = Tokenizer::from_gguf(&g)?;
        if tokenizer.vocab_size() != p.vocab {
            invalid!(
                "the tokenizer has {} tokens, the model {}",
                tokenizer.vocab_size(),
                p.vocab
            );
        }
        let config = LmConfig {
            vocab: p.vocab,
            d_model: p.d_model,
            layers: p.layers,
            heads_q: p.heads_q,
            heads_kv: p.heads_kv,
            d_ff: p.d_ff,
            max_seq: p.context,
            rope_theta: p.rope_base as f32,
            block: sparse.block,
            topk: sparse.topk,
            scoring: sparse.scoring,
            n_init: sparse.n_init,
            n_local: sparse.n_local,
            k_query: None,
            gate: false,
            rms_eps: p.rms_eps,
        };
        config.validate()?;
        let w = Weights {
            g: &g,
            bytes,
            device,
        };
        let (d, kv) = (p.d_model, p.heads_kv * p.head_dim);
        let layers = (0..p.layers)
            .map(|l| {
                let n = |t: &str| format!("blk.{l}.{t}.weight");
                Ok(Layer {
                    norm1: w.norm(&n("attn_norm"), d, p.rms_eps)?,
                    wq: w.linear(&n("attn_q"), d, d)?,
                    wk: w.linear(&n("attn_k"), d, kv)?,
                    wv: w.linear(&n("attn_v"), d, kv)?,
                    wg: None,
                    wo: w.linear(&n("attn_output"), d, d)?,
                    norm2: w.norm(&n("ffn_norm"), d, p.rms_eps)?,
                    w1: w.linear(&n("ffn_gate"), d, p.d_ff)?,
                    w3: w.linear(&n("ffn_up"), d, p.d_ff)?,
                    w2: w.linear(&n("ffn_down"), p.d_ff, d)?,
                    evict: None,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        // The embedding is `[d, vocab]` in GGUF terms: vocab rows of d, as Burn keeps it.
        let embed = Embedding {
            weight: Param::from_tensor(w.matrix("token_embd.weight", d, p.vocab, false)?),
        };
        let head = match g.tensors.iter().any(|t| t.name == "output.weight") {
            true => Some(w.linear("output.weight", d, p.vocab)?),
            false => None,
        };
        let model = Lm {
            embed,
            layers,
            norm: w.norm("output_norm.weight", d, p.rms_eps)?,
            head,
            rope: config.rope(device),
        };
        Ok(Self {
            model,
            config,
            tokenizer,
            params: p,
        })
    }
}

/// Reads tensors of one file onto a device.
struct Weights<'a> {
    g: &'a Gguf,
    bytes: &'a [u8],
    device: &'a Device,
}

impl Weights<'_> {
    /// Tensor `name` of GGUF dims `[inner, outer]` as `[inner, outer]`-shaped rows of `outer`
    /// (`transpose`) or as stored (`[outer, inner]`).
    fn matrix(&self, name: &str, inner: usize, outer: usize, transpose: bool) -> Result<Tensor<2>> {
        let x = self.g.read_shaped(self.bytes, name, &[inner, outer])?;
        let (data, shape) = match transpose {
            false => (x, [outer, inner]),
            true => {
                let mut y = vec![0f32; x.len()];
                for (r, row) in x.chunks_exact(inner).enumerate() {
                    for (c, v) in row.iter().enumerate() {
                        y[c * outer + r] = *v;
                    }
                }
                (y, [inner, outer])
            }
        };
        Ok(Tensor::from_data(TensorData::new(data, shape), self.device))
    }

    /// A projection from `d_in` to `d_out` (Burn's `[d_in, d_out]`), no bias.
    fn linear(&self, name: &str, d_in: usize, d_out: usize) -> Result<Linear> {
        Ok(Linear {
            weight: Param::from_tensor(self.matrix(name, d_in, d_out, true)?),
            bias: None,
        })
    }

    fn norm(&self, name: &str, d: usize, eps: f64) -> Result<RmsNorm> {
        let x = self.g.read_shaped(self.bytes, name, &[d])?;
        Ok(RmsNorm {
            gamma: Param::from_tensor(Tensor::from_data(TensorData::new(x, [d]), self.device)),
            epsilon: eps,
        })
    }
}
