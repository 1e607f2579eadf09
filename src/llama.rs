//! A Llama-family model from a GGUF file on this crate's own kernels, without Burn: what the
//! browser runs (`web/`'s model mode) and what any build of the library can run. The weights
//! are dequantised to f32 on the host and kept on the GPU; a forward embeds the tokens, runs
//! each layer (RMSNorm, q/k/v projections, RoPE, attention, output projection, SwiGLU, both
//! residuals) and the output head, with attention full or block-sparse over any selection.
//! It can keep every layer's q, k and v (after RoPE, `[b, heads, s, d]`) so that their
//! attention maps can be drawn. `reference::llama` is its f64 truth; `train::llama` runs the
//! same file through Burn.

use crate::error::{Result, invalid};
use crate::gguf::{Gguf, LlamaParams};
use crate::gpu::{DType, Encoder, Gpu, Tensor};
use crate::ops::attention::{AttnOutput, FullAttention};
use crate::ops::llama::{LlamaOps, Rope};
use crate::ops::select::{BlockSelect, SelectInputs};
use crate::ops::sparse::SparseAttention;
use crate::problem::{AttnOptions, AttnShape, SelectOptions};
use crate::{FullConfig, Qkv, SelectConfig, SparseConfig, SparseInputs};

#[derive(Debug)]
struct LayerWeights {
    attn_norm: Tensor,
    wq: Tensor,
    wk: Tensor,
    wv: Tensor,
    wo: Tensor,
    ffn_norm: Tensor,
    gate: Tensor,
    up: Tensor,
    down: Tensor,
}

/// Attention of a forward.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ModelAttention {
    Full,
    /// Block-sparse over each layer's own selection (the model is not trained for it: this is
    /// training-free sparse attention).
    Sparse(SelectOptions),
}

/// Which rows of logits a forward computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// After every token: `[b·s, vocab]`.
    All,
    /// After each sequence's last token: `[b, vocab]` (what generation and a preview need).
    Last,
}

/// How to run [`Llama::forward`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ForwardOptions {
    /// Sequences of `tokens.len() / batch` tokens each.
    pub batch: usize,
    pub attention: ModelAttention,
    pub logits: Logits,
    /// Keep every layer's q, k, v ([`Forward::layers`]).
    pub keep_qkv: bool,
}

impl ForwardOptions {
    /// One sequence, full attention, the last token's logits, nothing kept.
    pub fn new() -> Self {
        Self {
            batch: 1,
            attention: ModelAttention::Full,
            logits: Logits::Last,
            keep_qkv: false,
        }
    }
}

impl Default for ForwardOptions {
    fn default() -> Self {
        Self::new()
    }
}

/// One layer's attention inputs: q `[b, hq, s, d]`, k and v `[b, hkv, s, d]`, after RoPE.
#[derive(Debug)]
pub struct LayerQkv {
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
}

/// What a forward recorded; nothing is read back until the caller asks.
#[derive(Debug)]
pub struct Forward {
    /// `[rows, vocab]` (see [`Logits`]).
    pub logits: Tensor,
    /// Every layer's q, k, v when asked for, else empty.
    pub layers: Vec<LayerQkv>,
}

/// A Llama model's weights on the GPU and the kernels that run it.
#[derive(Debug)]
pub struct Llama {
    pub params: LlamaParams,
    ops: LlamaOps,
    embed: Tensor,
    /// `output.weight` where the file has one; else the head is the embedding (tied).
    head: Option<Tensor>,
    out_norm: Tensor,
    layers: Vec<LayerWeights>,
}

impl Llama {
    /// The model in the GGUF file `bytes`, its weights uploaded to `gpu` as f32.
    pub fn from_gguf(gpu: &Gpu, bytes: &[u8]) -> Result<Self> {
        let g = Gguf::parse(bytes)?;
        let p = LlamaParams::from_gguf(&g)?;
        crate::problem::check_head_dim(p.head_dim)?;
        let (d, kv, ff) = (p.d_model, p.heads_kv * p.head_dim, p.d_ff);
        // GGUF dims are innermost first: [d_in, d_out] is d_out rows of d_in, our [m, k].
        let load = |name: &str, d_in: usize, d_out: usize| -> Result<Tensor> {
            let x = g.read_shaped(bytes, name, &[d_in, d_out])?;
            gpu.upload(&[d_out, d_in], &x)
        };
        let norm = |name: &str| -> Result<Tensor> {
            let x = g.read_shaped(bytes, name, &[d])?;
            gpu.upload(&[d], &x)
        };
        let layers = (0..p.layers)
            .map(|l| {
                let n = |t: &str| format!("blk.{l}.{t}.weight");
                Ok(LayerWeights {
                    attn_norm: norm(&n("attn_norm"))?,
                    wq: load(&n("attn_q"), d, d)?,
                    wk: load(&n("attn_k"), d, kv)?,
                    wv: load(&n("attn_v"), d, kv)?,
                    wo: load(&n("attn_output"), d, d)?,
                    ffn_norm: norm(&n("ffn_norm"))?,
                    gate: load(&n("ffn_gate"), d, ff)?,
                    up: load(&n("ffn_up"), d, ff)?,
                    down: load(&n("ffn_down"), ff, d)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let head = match g.tensors.iter().any(|t| t.name == "output.weight") {
            true => Some(load("output.weight", d, p.vocab)?),
            false => None,
        };
        Ok(Self {
            ops: LlamaOps::new(gpu)?,
            embed: load("token_embd.weight", d, p.vocab)?,
            head,
            out_norm: norm("output_norm.weight")?,
            layers,
            params: p,
        })
    }

    /// Bytes of the weights on the GPU.
    pub fn weight_bytes(&self) -> u64 {
        let layer = |l: &LayerWeights| {
            [
                &l.attn_norm,
                &l.wq,
                &l.wk,
                &l.wv,
                &l.wo,
                &l.ffn_norm,
                &l.gate,
                &l.up,
                &l.down,
            ]
            .iter()
            .map(|t| t.size_bytes())
            .sum::<u64>()
        };
        self.layers.iter().map(layer).sum::<u64>()
            + self.embed.size_bytes()
            + self.head.as_ref().map_or(0, |t| t.size_bytes())
            + self.out_norm.size_bytes()
    }

    /// The attention problem of `batch` sequences of `seq` tokens.
    pub fn shape(&self, batch: usize, seq: usize) -> AttnShape {
        let p = &self.params;
        AttnShape::new(batch, p.heads_q, p.heads_kv, seq, p.head_dim)
    }

    /// Record the forward of `tokens` (`opts.batch` sequences of equal length, each from
    /// position 0) into `enc`; submit it, then read [`Forward::logits`].
    pub fn forward(
        &self,
        gpu: &Gpu,
        enc: &mut Encoder,
        tokens: &[u32],
        opts: &ForwardOptions,
    ) -> Result<Forward> {
        let p = &self.params;
        let b = opts.batch;
        if b == 0 || tokens.is_empty() || !tokens.len().is_multiple_of(b) {
            invalid!(
                "{} tokens do not make {b} sequences of equal nonzero length",
                tokens.len()
            );
        }
        let s = tokens.len() / b;
        if s > p.context {
            invalid!(
                "{s} tokens per sequence exceed the model's context of {}",
                p.context
            );
        }
        let n = b * s;
        let (d, ff, dh) = (p.d_model, p.d_ff, p.head_dim);
        let shape = self.shape(b, s);
        let attn = AttnOptions::causal(true);
        shape.validate(&attn)?;
        // Every activation is bound whole: the largest is the SwiGLU's [n, d_ff].
        let widest = 4 * (n * ff.max(d)) as u64;
        if widest > gpu.max_binding() {
            invalid!(
                "{n} tokens need activations of {widest} bytes, more than this device binds at \
                 once ({} bytes): run at most {} tokens at a time",
                gpu.max_binding(),
                gpu.max_binding() / (4 * ff.max(d)) as u64
            );
        }
        enum Att {
            Full(FullAttention),
            Sparse {
                select: Box<BlockSelect>,
                sparse: Box<SparseAttention>,
            },
        }
        let att = match opts.attention {
            ModelAttention::Full => {
                Att::Full(FullAttention::new(gpu, shape, &FullConfig::new(attn))?)
            }
            ModelAttention::Sparse(sel) => {
                if !sel.causal {
                    invalid!("a language model's sparse attention must be causal");
                }
                Att::Sparse {
                    select: Box::new(BlockSelect::new(gpu, shape, &SelectConfig::new(sel))?),
                    sparse: Box::new(SparseAttention::new(
                        gpu,
                        shape,
                        &SparseConfig::for_selection(&sel),
                    )?),
                }
            }
        };
        let f32t = |dims: &[usize]| gpu.empty(dims, DType::F32);
        let sel = match &att {
            Att::Sparse { select, .. } => Some((
                select.scratch(gpu)?,
                gpu.empty(&select.selection_dims(), DType::U32)?,
            )),
            Att::Full(_) => None,
        };
        let (x, x2) = (f32t(&[n, d])?, f32t(&[n, d])?);
        let h = f32t(&[n, d])?;
        let (qt, kt, vt) = (
            f32t(&[n, p.heads_q * dh])?,
            f32t(&[n, p.heads_kv * dh])?,
            f32t(&[n, p.heads_kv * dh])?,
        );
        let out = AttnOutput::empty(gpu, &shape)?;
        let merged = f32t(&[n, d])?;
        let (g, u, act) = (f32t(&[n, ff])?, f32t(&[n, ff])?, f32t(&[n, ff])?);
        let qkv_bufs = || -> Result<LayerQkv> {
            Ok(LayerQkv {
                q: f32t(&shape.q_dims())?,
                k: f32t(&shape.kv_dims())?,
                v: f32t(&shape.kv_dims())?,
            })
        };
        let mut kept = vec![];
        let mut shared = None;
        let rope = Rope {
            pos0: 0,
            base: p.rope_base,
        };
        let ops = &self.ops;
        ops.embed(gpu, enc, tokens, &self.embed, &x)?;
        for lw in &self.layers {
            let heads = match opts.keep_qkv {
                true => {
                    kept.push(qkv_bufs()?);
                    kept.last().unwrap()
                }
                false => {
                    if shared.is_none() {
                        shared = Some(qkv_bufs()?);
                    }
                    shared.as_ref().unwrap()
                }
            };
            ops.rms_norm(gpu, enc, &x, &lw.attn_norm, p.rms_eps, &h)?;
            ops.linear(gpu, enc, &h, &lw.wq, None, &qt)?;
            ops.linear(gpu, enc, &h, &lw.wk, None, &kt)?;
            ops.linear(gpu, enc, &h, &lw.wv, None, &vt)?;
            ops.heads(gpu, enc, &qt, Some(rope), &heads.q)?;
            ops.heads(gpu, enc, &kt, Some(rope), &heads.k)?;
            ops.heads(gpu, enc, &vt, None, &heads.v)?;
            let (q, k, v) = (&heads.q, &heads.k, &heads.v);
            match (&att, &sel) {
                (Att::Full(full), _) => full.encode_forward(gpu, enc, Qkv::new(q, k, v), &out)?,
                (Att::Sparse { select, sparse }, Some((scratch, selection))) => {
                    select.encode(gpu, enc, &SelectInputs::new(q, k), scratch, selection)?;
                    let inputs = SparseInputs::new(q, k, v, selection);
                    sparse.encode_forward(gpu, enc, &inputs, &out)?;
                }
                (Att::Sparse { .. }, None) => unreachable!("sparse attention has its selection"),
            }
            ops.merge(gpu, enc, &out.o, &merged)?;
            ops.linear(gpu, enc, &merged, &lw.wo, Some(&x), &x2)?;
            ops.rms_norm(gpu, enc, &x2, &lw.ffn_norm, p.rms_eps, &h)?;
            ops.linear(gpu, enc, &h, &lw.gate, None, &g)?;
            ops.linear(gpu, enc, &h, &lw.up, None, &u)?;
            ops.swiglu(gpu, enc, &g, &u, &act)?;
            ops.linear(gpu, enc, &act, &lw.down, Some(&x2), &x)?;
        }
        let head = self.head.as_ref().unwrap_or(&self.embed);
        let last = match opts.logits {
            Logits::All => None,
            Logits::Last => {
                // Each sequence's last row, gathered like an embedding lookup.
                let rows: Vec<u32> = (0..b).map(|i| (i * s + s - 1) as u32).collect();
                let last = f32t(&[b, d])?;
                ops.embed(gpu, enc, &rows, &x, &last)?;
                Some(last)
            }
        };
        let rows = last.as_ref().unwrap_or(&x);
        let normed = f32t(rows.shape())?;
        ops.rms_norm(gpu, enc, rows, &self.out_norm, p.rms_eps, &normed)?;
        let logits = f32t(&[rows.shape()[0], p.vocab])?;
        ops.linear(gpu, enc, &normed, head, None, &logits)?;
        Ok(Forward {
            logits,
            layers: kept,
        })
    }
}

/// The `n` most likely tokens of a row of logits, most likely first, with their softmax
/// probabilities (the page's next-token preview).
pub fn top_tokens(logits: &[f32], n: usize) -> Vec<(u32, f64)> {
    let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let z: f64 = logits.iter().map(|&l| (l as f64 - m).exp()).sum();
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    idx.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
    idx.into_iter()
        .take(n)
        .map(|i| (i, (logits[i as usize] as f64 - m).exp() / z))
        .collect()
}
