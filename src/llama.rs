//! A Llama-family model from a GGUF file on this crate's own kernels, without Burn: what the
//! browser runs (`web/`'s model mode) and what any build of the library can run. The weights
//! are dequantised to f32 on the host and kept on the GPU; a forward embeds the tokens, runs
//! each layer (RMSNorm, q/k/v projections, RoPE, attention, output projection, SwiGLU, both
//! residuals) and the output head, with attention full or block-sparse over any selection.
//! It can keep every layer's q, k and v (after RoPE, `[b, heads, s, d]`) so that their
//! attention maps can be drawn. [`Llama::decoder`] decodes with a KV cache (on the GPU or
//! offloaded: `decode::DecodeLayer` per layer). `reference::llama` is its f64 truth;
//! `train::llama` runs the same file through Burn.

use crate::decode::{DecodeLayer, LayerConfig};
use crate::error::{Result, invalid};
use crate::gguf::{Gguf, LlamaParams};
use crate::gpu::encoder::BindCache;
use crate::gpu::{DType, Encoder, Gpu, Tensor};
use crate::ops::attention::{AttnOutput, FullAttention};
use crate::ops::llama::{LlamaOps, Rope};
use crate::ops::select::{BlockSelect, SelectInputs};
use crate::ops::sparse::SparseAttention;
use crate::problem::{AttnOptions, AttnShape, CacheShape, SelectOptions};
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
        let shape = self.shape(b, s);
        let attn = AttnOptions::causal(true);
        shape.validate(&attn)?;
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
        let sel = match &att {
            Att::Sparse { select, .. } => Some((
                select.scratch(gpu)?,
                gpu.empty(&select.selection_dims(), DType::U32)?,
            )),
            Att::Full(_) => None,
        };
        let sc = Scratch::new(gpu, p, b, s)?;
        let out = AttnOutput::empty(gpu, &shape)?;
        let qkv_bufs = || -> Result<LayerQkv> {
            let f32t = |dims: &[usize]| gpu.empty(dims, DType::F32);
            Ok(LayerQkv {
                q: f32t(&shape.q_dims())?,
                k: f32t(&shape.kv_dims())?,
                v: f32t(&shape.kv_dims())?,
            })
        };
        let mut kept = vec![];
        let mut shared = None;
        self.ops.embed(gpu, enc, tokens, &self.embed, &sc.x)?;
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
            self.layer(gpu, enc, lw, &sc, heads, 0, &out.o, &mut |enc, h, o| {
                let (q, k, v) = (&h.q, &h.k, &h.v);
                let out = AttnOutput {
                    o: o.clone(),
                    lse: out.lse.clone(),
                };
                match (&att, &sel) {
                    (Att::Full(full), _) => full.encode_forward(gpu, enc, Qkv::new(q, k, v), &out),
                    (Att::Sparse { select, sparse }, Some((scratch, selection))) => {
                        select.encode(gpu, enc, &SelectInputs::new(q, k), scratch, selection)?;
                        let inputs = SparseInputs::new(q, k, v, selection);
                        sparse.encode_forward(gpu, enc, &inputs, &out)
                    }
                    (Att::Sparse { .. }, None) => {
                        unreachable!("sparse attention has its selection")
                    }
                }
            })?;
        }
        let out = HeadOut::new(gpu, p, b, s, opts.logits)?;
        let logits = self.logits(gpu, enc, &sc, &out)?;
        Ok(Forward {
            logits,
            layers: kept,
        })
    }

    /// One layer on `sc.x` (the result back in `sc.x`), its q, k, v written to `heads` (RoPE
    /// from position `pos0`); `attend` writes the attention output `[b, hq, s, d]` to `o`.
    #[allow(clippy::too_many_arguments)]
    fn layer(
        &self,
        gpu: &Gpu,
        enc: &mut Encoder,
        lw: &LayerWeights,
        sc: &Scratch,
        heads: &LayerQkv,
        pos0: usize,
        o: &Tensor,
        attend: &mut dyn FnMut(&mut Encoder, &LayerQkv, &Tensor) -> Result<()>,
    ) -> Result<()> {
        let (ops, eps) = (&self.ops, self.params.rms_eps);
        let rope = Rope {
            pos0,
            base: self.params.rope_base,
        };
        ops.rms_norm(gpu, enc, &sc.x, &lw.attn_norm, eps, &sc.h)?;
        ops.linear(gpu, enc, &sc.h, &lw.wq, None, &sc.qt)?;
        ops.linear(gpu, enc, &sc.h, &lw.wk, None, &sc.kt)?;
        ops.linear(gpu, enc, &sc.h, &lw.wv, None, &sc.vt)?;
        ops.heads(gpu, enc, &sc.qt, Some(rope), &heads.q)?;
        ops.heads(gpu, enc, &sc.kt, Some(rope), &heads.k)?;
        ops.heads(gpu, enc, &sc.vt, None, &heads.v)?;
        attend(enc, heads, o)?;
        ops.merge(gpu, enc, o, &sc.merged)?;
        ops.linear(gpu, enc, &sc.merged, &lw.wo, Some(&sc.x), &sc.x2)?;
        ops.rms_norm(gpu, enc, &sc.x2, &lw.ffn_norm, eps, &sc.h)?;
        ops.linear(gpu, enc, &sc.h, &lw.gate, None, &sc.g)?;
        ops.linear(gpu, enc, &sc.h, &lw.up, None, &sc.u)?;
        ops.swiglu(gpu, enc, &sc.g, &sc.u, &sc.act)?;
        ops.linear(gpu, enc, &sc.act, &lw.down, Some(&sc.x2), &sc.x)
    }

    /// The output head over `sc.x` into `out` (see [`HeadOut`]).
    fn logits(&self, gpu: &Gpu, enc: &mut Encoder, sc: &Scratch, out: &HeadOut) -> Result<Tensor> {
        let (ops, p) = (&self.ops, &self.params);
        let head = self.head.as_ref().unwrap_or(&self.embed);
        if let Some((last, rows)) = &out.last {
            ops.embed(gpu, enc, rows, &sc.x, last)?;
        }
        let rows = out.last.as_ref().map_or(&sc.x, |l| &l.0);
        ops.rms_norm(gpu, enc, rows, &self.out_norm, p.rms_eps, &out.normed)?;
        ops.linear(gpu, enc, &out.normed, head, None, &out.logits)?;
        Ok(out.logits.clone())
    }

    /// A decoder of `opts.batch` sequences over a KV cache (see [`LlamaDecoder`]).
    pub fn decoder(&self, gpu: &Gpu, opts: &DecoderOptions) -> Result<LlamaDecoder<'_>> {
        let p = &self.params;
        if opts.batch == 0 || opts.capacity == 0 {
            invalid!("a decoder needs at least one sequence and a capacity of at least one token");
        }
        if opts.capacity > p.context {
            invalid!(
                "a capacity of {} tokens exceeds the model's context of {}",
                opts.capacity,
                p.context
            );
        }
        let select = match opts.attention {
            ModelAttention::Full => None,
            ModelAttention::Sparse(s) => Some(s),
        };
        let mut capacity = opts.capacity;
        if let Some(s) = &select {
            // Room for the budget's blocks (a short sequence attends to all of its blocks).
            capacity = capacity.next_multiple_of(s.block).max(s.k * s.block);
        }
        let cache = CacheShape {
            batch: opts.batch,
            heads_kv: p.heads_kv,
            capacity,
            head_dim: p.head_dim,
        };
        let layer = LayerConfig {
            select,
            offload_slots: opts.offload_slots,
            ..LayerConfig::new(cache, p.heads_q, DType::F32)
        };
        let layers = (0..p.layers)
            .map(|_| DecodeLayer::new(gpu, &layer))
            .collect::<Result<Vec<_>>>()?;
        Ok(LlamaDecoder {
            model: self,
            batch: opts.batch,
            capacity: opts.capacity,
            len: 0,
            offloaded: opts.offload_slots.is_some(),
            binds: (0..p.layers).map(|_| BindCache::default()).collect(),
            layers,
            steps: Vec::new(),
        })
    }
}

/// The activations of one forward of `b · s` tokens.
#[derive(Debug)]
struct Scratch {
    x: Tensor,
    x2: Tensor,
    h: Tensor,
    qt: Tensor,
    kt: Tensor,
    vt: Tensor,
    merged: Tensor,
    g: Tensor,
    u: Tensor,
    act: Tensor,
}

impl Scratch {
    fn new(gpu: &Gpu, p: &LlamaParams, b: usize, s: usize) -> Result<Self> {
        let n = b * s;
        let (d, ff, kv) = (p.d_model, p.d_ff, p.heads_kv * p.head_dim);
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
        let t = |cols: usize| gpu.empty(&[n, cols], DType::F32);
        Ok(Self {
            x: t(d)?,
            x2: t(d)?,
            h: t(d)?,
            qt: t(p.heads_q * p.head_dim)?,
            kt: t(kv)?,
            vt: t(kv)?,
            merged: t(d)?,
            g: t(ff)?,
            u: t(ff)?,
            act: t(ff)?,
        })
    }
}

/// The output head's buffers for `b` sequences of `s` rows: each sequence's last row
/// (gathered like an embedding lookup, with the row indices) where only those are wanted and
/// `s > 1`, the normed rows, the logits.
#[derive(Debug)]
struct HeadOut {
    last: Option<(Tensor, Vec<u32>)>,
    normed: Tensor,
    logits: Tensor,
}

impl HeadOut {
    fn new(gpu: &Gpu, p: &LlamaParams, b: usize, s: usize, which: Logits) -> Result<Self> {
        let last = match which {
            Logits::Last if s > 1 => Some((
                gpu.empty(&[b, p.d_model], DType::F32)?,
                (0..b).map(|i| (i * s + s - 1) as u32).collect(),
            )),
            _ => None,
        };
        let rows = if last.is_some() || which == Logits::Last {
            b
        } else {
            b * s
        };
        Ok(Self {
            last,
            normed: gpu.empty(&[rows, p.d_model], DType::F32)?,
            logits: gpu.empty(&[rows, p.vocab], DType::F32)?,
        })
    }
}

/// How to build a [`LlamaDecoder`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DecoderOptions {
    pub batch: usize,
    /// Tokens per sequence the cache holds (prompt and generated).
    pub capacity: usize,
    pub attention: ModelAttention,
    /// Offload the KV cache to host memory with this many GPU block slots per (sequence, kv
    /// head) (NOSA's engine; sparse attention only).
    pub offload_slots: Option<usize>,
}

/// The state of one width of step (`n` tokens per sequence): its activations and buffers.
struct DecodeStep {
    n: usize,
    sc: Scratch,
    heads: LayerQkv,
    o: Tensor,
    out: HeadOut,
}

/// Decoding with a KV cache on our kernels: [`Self::step`] feeds `n` tokens per sequence (a
/// prompt, then one at a time) through every layer's [`DecodeLayer`] (append, select where
/// sparse, copy missing blocks where offloaded, attend) and returns the logits after each
/// sequence's last token. The sequences advance together (equal lengths).
pub struct LlamaDecoder<'m> {
    model: &'m Llama,
    batch: usize,
    capacity: usize,
    len: usize,
    offloaded: bool,
    layers: Vec<DecodeLayer>,
    /// One per layer: the bind groups of its dispatches around attention.
    binds: Vec<BindCache>,
    /// Kept per step width: the layers keep their bind groups when the buffers repeat.
    steps: Vec<DecodeStep>,
}

/// Prompt tokens per sequence and step when the cache is on the GPU.
const PROMPT_STEP: usize = 64;

impl LlamaDecoder<'_> {
    /// Tokens per sequence decoded so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Record the step of `tokens` (`batch` sequences of `n` tokens each, sequence-major) into
    /// `enc`; returns the logits `[batch, vocab]` after each sequence's last new token (read
    /// them after submitting; the buffer is the decoder's, rewritten by the next step).
    pub fn step(&mut self, gpu: &Gpu, enc: &mut Encoder, tokens: &[u32]) -> Result<Tensor> {
        let b = self.batch;
        if tokens.is_empty() || !tokens.len().is_multiple_of(b) {
            invalid!(
                "{} tokens do not make {b} sequences of equal nonzero length",
                tokens.len()
            );
        }
        let n = tokens.len() / b;
        // Checked here as well as by the embedding: a prompt taken in parts must not fail
        // half way.
        if let Some(&bad) = tokens
            .iter()
            .find(|&&t| t as usize >= self.model.params.vocab)
        {
            invalid!(
                "token id {bad} is outside the vocabulary of {}",
                self.model.params.vocab
            );
        }
        if self.len + n > self.capacity {
            invalid!(
                "{} more tokens per sequence would exceed the decoder's capacity of {} ({} used)",
                n,
                self.capacity,
                self.len
            );
        }
        // A prompt goes through a cache on the GPU PROMPT_STEP tokens at a time (the decode
        // kernels' partial results grow with the new tokens); an offloaded cache takes it whole
        // (through the prefill kernels: its GPU slots hold one query's blocks).
        let width = match self.offloaded {
            true => n,
            false => n.min(PROMPT_STEP),
        };
        let mut last = None;
        for t0 in (0..n).step_by(width) {
            let t1 = (t0 + width).min(n);
            let part: Vec<u32> = tokens.chunks(n).flat_map(|q| q[t0..t1].to_vec()).collect();
            last = Some(self.layers_step(gpu, enc, &part, t1 - t0)?);
        }
        let i = last.expect("at least one token per sequence");
        let st = &self.steps[i];
        let logits = self.model.logits(gpu, enc, &st.sc, &st.out)?;
        Ok(logits)
    }

    /// Every layer for `tokens`, `n` per sequence; returns the index of the step state whose
    /// `sc.x` holds the result.
    fn layers_step(
        &mut self,
        gpu: &Gpu,
        enc: &mut Encoder,
        tokens: &[u32],
        n: usize,
    ) -> Result<usize> {
        let (m, b) = (self.model, self.batch);
        let i = match self.steps.iter().position(|st| st.n == n) {
            Some(i) => i,
            None => {
                let shape = m.shape(b, n);
                let f32t = |dims: &[usize]| gpu.empty(dims, DType::F32);
                self.steps.push(DecodeStep {
                    n,
                    sc: Scratch::new(gpu, &m.params, b, n)?,
                    heads: LayerQkv {
                        q: f32t(&shape.q_dims())?,
                        k: f32t(&shape.kv_dims())?,
                        v: f32t(&shape.kv_dims())?,
                    },
                    o: f32t(&shape.q_dims())?,
                    out: HeadOut::new(gpu, &m.params, b, n, Logits::Last)?,
                });
                self.steps.len() - 1
            }
        };
        let st = &self.steps[i];
        m.ops.embed(gpu, enc, tokens, &m.embed, &st.sc.x)?;
        let pos0 = self.len;
        for ((lw, dl), binds) in m.layers.iter().zip(&mut self.layers).zip(&self.binds) {
            // Each step records the same dispatches on the same buffers: keep the bind groups
            // (they cost more host time than the small kernels of a step take on the GPU).
            enc.keeping(binds, |enc| {
                m.layer(
                    gpu,
                    enc,
                    lw,
                    &st.sc,
                    &st.heads,
                    pos0,
                    &st.o,
                    &mut |enc, h, o| dl.encode_step(gpu, enc, &h.q, &h.k, &h.v, None, o),
                )
            })?;
        }
        self.len += n;
        Ok(i)
    }

    /// Hit rate of the offloaded cache's GPU slots over the steps so far (None: not offloaded).
    /// Native: it waits for the GPU.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn hit_rate(&self, gpu: &Gpu) -> Result<Option<f64>> {
        let mut hits = (0u64, 0u64);
        for l in &self.layers {
            if let Some(s) = l.offload_stats(gpu)? {
                hits.0 += s.hits;
                hits.1 += s.selected;
            }
        }
        Ok((hits.1 > 0).then(|| hits.0 as f64 / hits.1 as f64))
    }

    /// Bytes of the KV cache on the GPU and in host memory, all layers.
    pub fn kv_bytes(&self) -> (u64, u64) {
        self.layers.iter().fold((0, 0), |a, l| {
            let (g, h) = l.kv_bytes();
            (a.0 + g, a.1 + h)
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
