//! A small Llama-style language model in Burn whose attention runs our kernels: RMSNorm, RoPE,
//! grouped-query attention with a sigmoid output gate, SwiGLU MLP, tied embeddings.
//!
//! Attention per layer, by [`Mode`]:
//! - `Full`: h = g ⊙ FullAttn(q, k, v);
//! - `Sparse`: h = g ⊙ SparseAttn(q, k, v) over the blocks the selector picks (the SSA paper's
//!   MoBA-style sparse baseline);
//! - `Ssa`: both streams at every layer on the same q, k, v; the stream drawn for this forward
//!   (Bernoulli(0.5), shared by all layers) continues, and the layer's alignment loss
//!   SmoothL1(h_full, sg(h_sparse)) + SmoothL1(h_sparse, sg(h_full)) is returned
//!   (PAPERS.md section 2). The gate g = sigmoid(W_g x) is elementwise per head.
//! - `Nosa`: NOSA (NOSA.md): an eviction head per layer, b_t = A ⊙ softplus(δ(v_t)) per kv head
//!   (A initialised to 0, δ a linear map from all kv heads' values of token t), is an additive
//!   per-key bias of the attention logits and, pooled, the query-agnostic score that picks the
//!   last `evict` blocks of the selection; h = g ⊙ SparseAttn(q, k, v; bias b). The bias gets
//!   its gradient through our kernels' d bias; the selection is not differentiable.
//! - `NosaSsa` (ours, unpublished): SSA's two streams and alignment with NOSA's selection and
//!   bias in the sparse stream and the same bias in the full stream.
//!
//! A model built with an eviction head (`LmConfig::k_query`) runs it in every mode, full and
//! sparse inference alike.

use burn::module::{Module, Param};
use burn::nn::{
    Embedding, EmbeddingConfig, Initializer, Linear, LinearConfig, RmsNorm, RmsNormConfig,
    RotaryEncoding, RotaryEncodingConfig,
};
use burn::tensor::activation::{log_softmax, sigmoid, silu, softplus};
use burn::tensor::{Device, FloatDType, Int, Tensor};

use crate::error::{Result, invalid};
use crate::problem::AttnOptions;
use crate::problem::{Scoring, SelectOptions};
use crate::train::ops::{align_loss, attention_with_bias, select_for, sparse_attention_with_bias};

/// RMSNorm (`burn::nn::RmsNorm`'s maths and parameters) over `x` `[b, t, d]`, with the weight
/// applied per group of R rows: Burn reduces a broadcast weight's gradient over all b·t rows in
/// one pass with a thread per column (384 threads for 32768 x 384: 6.4 ms a norm on the H200,
/// 83 ms of a 659 ms training step, docs/BENCHMARKS.md). With the weight repeated R times the
/// gradient sums over b·t / R rows for R·d columns, then over R (`repeat_dim`'s backward).
pub fn rms_norm(norm: &RmsNorm, x: Tensor<3>) -> Tensor<3> {
    let [b, t, d] = x.dims();
    let rms = (x.clone().square().mean_dim(2) + norm.epsilon).sqrt();
    let xh = x / rms;
    let n = b * t;
    // The largest power of two up to 128 that divides the rows (1: one pass, as Burn's).
    let r = 1usize << n.trailing_zeros().min(7);
    let gamma = norm
        .gamma
        .val()
        .reshape([1, d])
        .repeat_dim(0, r)
        .reshape([1, r, d]);
    (xh.reshape([n / r, r, d]) * gamma).reshape([b, t, d])
}

/// Operands of the linear layers' matrix products (weights, activations and their
/// gradients inside the products) and the storage of attention's q, k, v, O and their
/// gradients (full and sparse). Master weights, norms, the selection, softmax, the alignment
/// loss and the loss stay f32.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    #[default]
    F32,
    /// f16 operands with f32 accumulation (CubeCL's f16 matmuls; tensor cores on the Vulkan
    /// path). Training scales the loss so that small gradients survive f16 (`LossScale`).
    F16,
}

impl Precision {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            _ => invalid!("unknown precision `{s}` (known: f32, f16)"),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
        }
    }

    /// `t` stored in this precision (unchanged in f32).
    pub fn store<const D: usize>(self, t: Tensor<D>) -> Tensor<D> {
        match self {
            Self::F32 => t,
            Self::F16 => t.cast(FloatDType::F16),
        }
    }

    /// `a b` with operands in this precision, the result in f32 (CubeCL accumulates f16
    /// products in f32).
    pub fn matmul(self, a: Tensor<3>, b: Tensor<3>) -> Tensor<3> {
        match self {
            Self::F32 => a.matmul(b),
            Self::F16 => self.store(a).matmul(self.store(b)).cast(FloatDType::F32),
        }
    }
}

/// Vocabularies up to this size embed tokens by a one-hot product in training.
pub const ONE_HOT_VOCAB: usize = 1024;

/// RoPE over `x` `[b, heads, s, d]` at positions `start ..`: the maths of Burn's
/// `RotaryEncoding::apply` (pairs (a, b) -> (a c - b s, b c + a s) with its cos/sin table),
/// elementwise. Burn's own builds the rotated pairs with a matmul of K = 2, which CubeCL runs
/// on SIMT cores at ~6 ms a call at the training shape: 2 x 12 calls, ~148 ms of a 443 ms step
/// on the H200 (docs/BENCHMARKS.md).
pub fn rope(r: &RotaryEncoding, x: Tensor<4>, start: usize) -> Tensor<4> {
    let [b, h, s, d] = x.dims();
    let table = r.freq_complex.clone().slice([start..start + s, 0..d, 0..2]);
    let cos = table
        .clone()
        .slice([0..s, 0..d, 0..1])
        .reshape([1, 1, s, d]);
    let sin = table.slice([0..s, 0..d, 1..2]).reshape([1, 1, s, d]);
    // (a, b) -> (-b, a) per pair.
    let sign = Tensor::<1>::from_floats([-1.0, 1.0], &x.device()).reshape([1, 1, 1, 1, 2]);
    let turned = (x.clone().reshape([b, h, s, d / 2, 2]).flip([4]) * sign).reshape([b, h, s, d]);
    x * cos + turned * sin
}

/// `x W + b` with `l`'s parameters, the product's operands in `p` (the result in f32).
pub fn linear(l: &Linear, x: Tensor<3>, p: Precision) -> Tensor<3> {
    if p == Precision::F32 {
        return l.forward(x);
    }
    let y = p.matmul(x, l.weight.val().unsqueeze::<3>());
    match &l.bias {
        Some(b) => y + b.val().unsqueeze::<3>(),
        None => y,
    }
}

/// How attention runs in training or inference.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Full,
    Sparse,
    Ssa,
    Nosa,
    NosaSsa,
}

impl Mode {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "full" => Ok(Mode::Full),
            "sparse" | "moba" => Ok(Mode::Sparse),
            "ssa" => Ok(Mode::Ssa),
            "nosa" => Ok(Mode::Nosa),
            "nosa-ssa" => Ok(Mode::NosaSsa),
            _ => invalid!("unknown mode `{s}` (expected full, sparse, ssa, nosa or nosa-ssa)"),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Mode::Full => "full",
            Mode::Sparse => "sparse",
            Mode::Ssa => "ssa",
            Mode::Nosa => "nosa",
            Mode::NosaSsa => "nosa-ssa",
        }
    }
    /// Only the sparse stream runs (sparse, nosa).
    pub fn sparse_only(self) -> bool {
        matches!(self, Mode::Sparse | Mode::Nosa)
    }
    /// Both streams with the alignment loss (ssa, nosa-ssa).
    pub fn two_streams(self) -> bool {
        matches!(self, Mode::Ssa | Mode::NosaSsa)
    }
    /// Needs a model with NOSA's eviction head.
    pub fn nosa(self) -> bool {
        matches!(self, Mode::Nosa | Mode::NosaSsa)
    }
}

/// Architecture and sparse-attention settings of a model.
#[derive(Clone, Debug, PartialEq)]
pub struct LmConfig {
    pub vocab: usize,
    pub d_model: usize,
    pub layers: usize,
    pub heads_q: usize,
    pub heads_kv: usize,
    pub d_ff: usize,
    /// Longest sequence RoPE is prepared for (evaluation may go past the training length).
    pub max_seq: usize,
    pub rope_theta: f32,
    /// Block size and blocks kept per token (receptive field = block · topk).
    pub block: usize,
    pub topk: usize,
    /// How the selector scores blocks, and its forced initial and local blocks.
    pub scoring: Scoring,
    pub n_init: usize,
    pub n_local: usize,
    /// NOSA: blocks chosen by the query besides the forced ones; the rest of `topk` by the
    /// eviction head, which the model then has (one per layer). `None`: no eviction head.
    pub k_query: Option<usize>,
    /// The sigmoid output gate of attention (our trained models); pretrained Llama models
    /// have none.
    pub gate: bool,
    /// RMSNorm's epsilon.
    pub rms_eps: f64,
}

impl LmConfig {
    pub fn head_dim(&self) -> usize {
        self.d_model / self.heads_q
    }

    pub fn validate(&self) -> Result<()> {
        for (n, v) in [
            ("vocab", self.vocab),
            ("d_model", self.d_model),
            ("layers", self.layers),
            ("heads_q", self.heads_q),
            ("heads_kv", self.heads_kv),
            ("d_ff", self.d_ff),
            ("max_seq", self.max_seq),
            ("topk", self.topk),
        ] {
            if v == 0 {
                invalid!("{n} must be at least 1");
            }
        }
        if !self.d_model.is_multiple_of(self.heads_q) {
            invalid!(
                "d_model {} is not a multiple of heads_q {}",
                self.d_model,
                self.heads_q
            );
        }
        if !self.heads_q.is_multiple_of(self.heads_kv) {
            invalid!(
                "heads_q {} is not a multiple of heads_kv {} (grouped-query attention)",
                self.heads_q,
                self.heads_kv
            );
        }
        if !crate::problem::head_dim_supported(self.head_dim()) {
            invalid!(
                "head_dim {} (d_model / heads_q) is not supported: use a multiple of 16 from 16 \
                 to 256",
                self.head_dim()
            );
        }
        if !self.head_dim().is_multiple_of(2) {
            invalid!("RoPE needs an even head_dim");
        }
        if let Some(kq) = self.k_query {
            // Names the numbers when k_query and the forced blocks overrun topk.
            SelectOptions::nosa_budget(self.block, self.topk, self.n_init, self.n_local, kq)?;
        }
        self.select_options().validate(&crate::AttnShape::new(
            1,
            self.heads_q,
            self.heads_kv,
            self.max_seq.max(self.receptive_field()),
            self.head_dim(),
        ))?;
        Ok(())
    }

    /// Tokens a sparse query sees at most.
    pub fn receptive_field(&self) -> usize {
        self.block * self.topk
    }

    /// Selection settings for sequences of `seq` tokens: the budget is capped at the blocks
    /// there are (a sequence shorter than the receptive field is attended in full).
    /// With fewer blocks than the budget every candidate is kept, whatever the split, so the
    /// selection is the plain one (no eviction stage, no forced blocks beyond the current one).
    pub fn select_options_for(&self, seq: usize) -> SelectOptions {
        let nb = seq.div_ceil(self.block);
        if nb <= self.topk {
            return SelectOptions {
                k: nb,
                n_init: 0,
                n_local: 0,
                evict: 0,
                ..self.select_options()
            };
        }
        self.select_options()
    }

    pub fn select_options(&self) -> SelectOptions {
        let forced = self.n_init + self.n_local + 1;
        SelectOptions {
            block: self.block,
            k: self.topk,
            n_init: self.n_init,
            n_local: self.n_local,
            scoring: self.scoring,
            causal: true,
            scale: None,
            evict: self
                .k_query
                .map_or(0, |kq| self.topk.saturating_sub(forced + kq)),
        }
    }

    /// The model has NOSA's eviction head.
    pub fn has_evict_head(&self) -> bool {
        self.k_query.is_some()
    }

    /// The same model with another sparse budget (inference-time budget sweeps).
    pub fn with_topk(&self, topk: usize) -> Self {
        Self {
            topk,
            ..self.clone()
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "vocab": self.vocab, "d_model": self.d_model, "layers": self.layers,
            "heads_q": self.heads_q, "heads_kv": self.heads_kv, "d_ff": self.d_ff,
            "max_seq": self.max_seq, "rope_theta": self.rope_theta,
            "block": self.block, "topk": self.topk,
            "scoring": self.scoring.name(), "n_init": self.n_init,
            "n_local": self.n_local, "k_query": self.k_query,
            "gate": self.gate, "rms_eps": self.rms_eps,
        })
    }

    pub fn from_json(v: &serde_json::Value) -> Result<Self> {
        let u = |k: &str| -> Result<usize> {
            v.get(k)
                .and_then(|x| x.as_u64())
                .map(|x| x as usize)
                .ok_or_else(|| crate::Error::InvalidInput(format!("model config lacks `{k}`")))
        };
        let c = Self {
            vocab: u("vocab")?,
            d_model: u("d_model")?,
            layers: u("layers")?,
            heads_q: u("heads_q")?,
            heads_kv: u("heads_kv")?,
            d_ff: u("d_ff")?,
            max_seq: u("max_seq")?,
            rope_theta: v
                .get("rope_theta")
                .and_then(|x| x.as_f64())
                .unwrap_or(10000.0) as f32,
            block: u("block")?,
            topk: u("topk")?,
            // Absent in checkpoints made before NOSA: SSA scoring, no forced blocks, no
            // eviction head (what those models were trained with).
            scoring: match v.get("scoring").and_then(|x| x.as_str()) {
                Some(s) => Scoring::parse(s)?,
                None => Scoring::Ssa,
            },
            n_init: v.get("n_init").and_then(|x| x.as_u64()).unwrap_or(0) as usize,
            n_local: v.get("n_local").and_then(|x| x.as_u64()).unwrap_or(0) as usize,
            k_query: match v.get("k_query") {
                None | Some(serde_json::Value::Null) => None,
                Some(x) => Some(x.as_u64().ok_or_else(|| {
                    crate::Error::InvalidInput(format!(
                        "model config: k_query = {x} is not a count"
                    ))
                })? as usize),
            },
            // Absent before pretrained models: every model had the gate and Burn's epsilon.
            gate: v.get("gate").and_then(|x| x.as_bool()).unwrap_or(true),
            rms_eps: v.get("rms_eps").and_then(|x| x.as_f64()).unwrap_or(1e-5),
        };
        c.validate()?;
        Ok(c)
    }

    /// Parameters, embeddings counted once (tied).
    /// Every tensor a training step of `batch` x `seq` tokens makes (weights, RoPE tables,
    /// activations, logits) must fit one storage binding of the device, `max_binding` bytes:
    /// Burn's kernels and ours bind whole tensors. Checked before the model is built, so that
    /// an oversized `--d-ff` or `--max-seq` is an error that names the flag instead of a panic
    /// inside an allocation (or a run that creeps on).
    pub fn check_fits(&self, max_binding: u64, batch: usize, seq: usize) -> Result<()> {
        let (d, dh, ff) = (
            self.d_model as u128,
            self.head_dim() as u128,
            self.d_ff as u128,
        );
        let (b, s) = (batch as u128, seq as u128);
        let tensors = [
            (
                "the embedding (vocab x d_model)",
                self.vocab as u128 * d,
                "--d-model",
            ),
            ("an MLP weight (d_model x d_ff)", d * ff, "--d-ff"),
            (
                "the RoPE tables (max_seq x head_dim x 2)",
                self.max_seq as u128 * dh * 2,
                "--max-seq",
            ),
            (
                "an MLP activation (batch x seq x d_ff)",
                b * s * ff,
                "--batch, --seq or --d-ff",
            ),
            (
                "the logits (batch x seq x vocab)",
                b * s * self.vocab as u128,
                "--batch or --seq",
            ),
            (
                "an attention input (batch x seq x d_model)",
                b * s * d,
                "--batch or --seq",
            ),
        ];
        for (what, elems, flag) in tensors {
            let bytes = elems.saturating_mul(4);
            if bytes > max_binding as u128 {
                return Err(crate::Error::Unsupported(format!(
                    "{what} would take {bytes} bytes; this device binds at most {max_binding} \
                     bytes per tensor (lower {flag})"
                )));
            }
        }
        Ok(())
    }

    pub fn params(&self) -> usize {
        let d = self.d_model;
        let kv = self.heads_kv * self.head_dim();
        let attn = d * d * (2 + self.gate as usize) + 2 * d * kv; // q, o (gate) + k, v
        let mlp = 3 * d * self.d_ff;
        // NOSA's eviction head: A (one per kv head) and δ (all kv heads' values -> one score
        // per kv head, with a bias).
        let evict = if self.has_evict_head() {
            self.heads_kv + (kv + 1) * self.heads_kv
        } else {
            0
        };
        self.vocab * d + self.layers * (attn + mlp + 2 * d + evict) + d
    }

    pub fn init(&self, device: &Device) -> Result<Lm> {
        self.validate()?;
        let dh = self.head_dim();
        let lin = |i, o| {
            LinearConfig::new(i, o)
                .with_bias(false)
                .with_initializer(Initializer::Normal {
                    mean: 0.0,
                    std: 0.02,
                })
                .init(device)
        };
        // Residual branches' output projections scaled down by depth (GPT-2 style).
        let out = |i, o| {
            LinearConfig::new(i, o)
                .with_bias(false)
                .with_initializer(Initializer::Normal {
                    mean: 0.0,
                    std: 0.02 / (2.0 * self.layers as f64).sqrt(),
                })
                .init(device)
        };
        let layers = (0..self.layers)
            .map(|_| Layer {
                norm1: self.rms_norm(device),
                wq: lin(self.d_model, self.d_model),
                wk: lin(self.d_model, self.heads_kv * dh),
                wv: lin(self.d_model, self.heads_kv * dh),
                wg: self.gate.then(|| lin(self.d_model, self.d_model)),
                wo: out(self.d_model, self.d_model),
                norm2: self.rms_norm(device),
                w1: lin(self.d_model, self.d_ff),
                w3: lin(self.d_model, self.d_ff),
                w2: out(self.d_ff, self.d_model),
                evict: self.has_evict_head().then(|| EvictHead {
                    // A = 0: training starts from plain InfLLM-V2 (no bias, no eviction signal).
                    a: Param::from_tensor(Tensor::zeros([self.heads_kv], device)),
                    delta: LinearConfig::new(self.heads_kv * dh, self.heads_kv)
                        .with_bias(true)
                        .with_initializer(Initializer::Normal {
                            mean: 0.0,
                            std: 0.02,
                        })
                        .init(device),
                }),
            })
            .collect();
        Ok(Lm {
            embed: EmbeddingConfig::new(self.vocab, self.d_model)
                .with_initializer(Initializer::Normal {
                    mean: 0.0,
                    std: 0.02,
                })
                .init(device),
            layers,
            norm: self.rms_norm(device),
            head: None,
            rope: self.rope(device),
        })
    }

    pub(crate) fn rms_norm(&self, device: &Device) -> RmsNorm {
        RmsNormConfig::new(self.d_model)
            .with_epsilon(self.rms_eps)
            .init(device)
    }

    pub(crate) fn rope(&self, device: &Device) -> RotaryEncoding {
        RotaryEncodingConfig::new(self.max_seq, self.head_dim())
            .with_theta(self.rope_theta)
            .init(device)
    }
}

#[derive(Module, Debug)]
pub struct Layer {
    pub(crate) norm1: RmsNorm,
    pub(crate) wq: Linear,
    pub(crate) wk: Linear,
    pub(crate) wv: Linear,
    /// The output gate (`LmConfig::gate`).
    pub(crate) wg: Option<Linear>,
    pub(crate) wo: Linear,
    pub(crate) norm2: RmsNorm,
    pub(crate) w1: Linear,
    pub(crate) w3: Linear,
    pub(crate) w2: Linear,
    /// NOSA's eviction head (models built with `k_query`).
    pub(crate) evict: Option<EvictHead>,
}

/// NOSA's eviction head of one layer (NOSA.md §1): b_t = A ⊙ softplus(δ(v_t)), one value per kv
/// head and token, v_t all kv heads' values of token t.
#[derive(Module, Debug)]
pub struct EvictHead {
    a: Param<Tensor<1>>,
    delta: Linear,
}

impl EvictHead {
    /// `v` `[b, s, hkv·dh]` -> the bias `[b, hkv, s]`.
    fn forward(&self, v: Tensor<3>) -> Tensor<3> {
        let z = softplus(self.delta.forward(v), 1.0);
        let a = self.a.val().unsqueeze::<3>();
        (z * a).swap_dims(1, 2)
    }
}

#[derive(Module, Debug)]
pub struct Lm {
    pub(crate) embed: Embedding,
    pub(crate) layers: Vec<Layer>,
    pub(crate) norm: RmsNorm,
    /// An output head of its own (`[d_model, vocab]`); `None`: tied to the embedding.
    pub(crate) head: Option<Linear>,
    pub(crate) rope: RotaryEncoding,
}

/// What one forward pass returns besides the logits.
pub struct Forward {
    /// `[batch, seq, vocab]`
    pub logits: Tensor<3>,
    /// Mean over layers of the alignment loss (SSA mode only).
    pub align: Option<Tensor<1>>,
    /// Each layer's q and k after RoPE and its NOSA bias (models with an eviction head),
    /// detached, when `Run::capture` is set (metrics).
    pub qk: Vec<Captured>,
}

/// One layer's attention inputs as evaluation reads them.
pub struct Captured {
    pub q: Tensor<4>,
    pub k: Tensor<4>,
    /// `[b, hkv, seq]`: NOSA's per-key bias and eviction score.
    pub bias: Option<Tensor<3>>,
}

/// How the attention of one forward pass runs.
#[derive(Clone, Copy, Debug)]
pub struct Run {
    pub mode: Mode,
    /// SSA: which stream continues (true = sparse). Ignored by the other modes.
    pub sparse_main: bool,
    /// Return each layer's q and k (evaluation metrics).
    pub capture: bool,
    /// Operands of the linear layers' products.
    pub precision: Precision,
}

impl Run {
    pub fn new(mode: Mode) -> Self {
        Self {
            mode,
            sparse_main: mode.sparse_only(),
            capture: false,
            precision: Precision::F32,
        }
    }
}

impl Lm {
    /// NOSA's A of every layer (one per kv head; empty without an eviction head): how strongly
    /// the learned bias acts (0 at initialisation).
    pub fn evict_scales(&self) -> Result<Vec<Vec<f32>>> {
        self.layers
            .iter()
            .filter_map(|l| l.evict.as_ref())
            .map(|e| {
                e.a.val()
                    .into_data()
                    .convert::<f32>()
                    .try_to_vec::<f32>()
                    .map_err(|e| crate::Error::Gpu(format!("reading A back: {e:?}")))
            })
            .collect()
    }

    /// Logits for `tokens` `[batch, seq]` (and the SSA alignment loss).
    pub fn forward(&self, cfg: &LmConfig, tokens: Tensor<2, Int>, run: Run) -> Result<Forward> {
        let [b, s] = tokens.dims();
        if s > cfg.max_seq {
            invalid!(
                "sequence of {s} tokens exceeds the model's max_seq {}",
                cfg.max_seq
            );
        }
        let mut x = self.embed_tokens(cfg, tokens, run.precision);
        let mut aligns = Vec::new();
        let mut qk = Vec::new();
        for layer in &self.layers {
            let (y, a) = layer.forward(cfg, &self.rope, x, b, s, run, &mut qk)?;
            x = y;
            aligns.extend(a);
        }
        let logits = self.logits(rms_norm(&self.norm, x), run.precision);
        let n = aligns.len();
        let align = (n > 0).then(|| Tensor::cat(aligns, 0).sum() / n as f32);
        Ok(Forward { logits, align, qk })
    }
}

impl Lm {
    /// Decoding: the logits `[b, n, vocab]` after n new tokens per sequence (`tokens`
    /// `[b, n]`) at positions `pos ..`, each layer's attention over its cache (`layers`, see
    /// `train::generate`), which the step extends. `last_only`: the logits after the last of
    /// them only, `[b, 1, vocab]` (a long prompt's would not fit in memory).
    pub(crate) fn decode_step(
        &self,
        cfg: &LmConfig,
        tokens: Tensor<2, Int>,
        pos: usize,
        layers: &[crate::train::generate::DecodeCfg],
        last_only: bool,
    ) -> Result<Tensor<3>> {
        if layers.len() != self.layers.len() {
            invalid!(
                "{} layer caches for a model of {} layers",
                layers.len(),
                self.layers.len()
            );
        }
        let [_, n] = tokens.dims();
        if pos + n > cfg.max_seq {
            invalid!(
                "positions {pos}..{} are past the model's max_seq {}",
                pos + n,
                cfg.max_seq
            );
        }
        let mut x = self.embed.forward(tokens);
        for (layer, state) in self.layers.iter().zip(layers) {
            x = layer.decode(cfg, &self.rope, x, pos, state);
        }
        if last_only {
            let [b, n, d] = x.dims();
            x = x.slice([0..b, n - 1..n, 0..d]);
        }
        Ok(self.logits(rms_norm(&self.norm, x), Precision::F32))
    }

    /// Token embeddings `[b, s, d]`. Small vocabularies (up to [`ONE_HOT_VOCAB`]) take a
    /// one-hot product: Burn's embedding gradient is a scatter-add whose atomics contend for V
    /// rows (15.7 ms of a training step at V = 256 on the H200), a product is ~0.1 ms.
    fn embed_tokens(&self, cfg: &LmConfig, tokens: Tensor<2, Int>, p: Precision) -> Tensor<3> {
        if cfg.vocab > ONE_HOT_VOCAB {
            return self.embed.forward(tokens);
        }
        let ids = Tensor::<1, Int>::arange(0..cfg.vocab as i64, &tokens.device())
            .reshape([1, 1, cfg.vocab]);
        let onehot = tokens.unsqueeze_dim::<3>(2).equal(ids).float();
        p.matmul(onehot, self.embed.weight.val().unsqueeze::<3>())
    }

    /// The output head: tied (h Eᵀ) or the model's own.
    fn logits(&self, h: Tensor<3>, p: Precision) -> Tensor<3> {
        match &self.head {
            Some(head) => linear(head, h, p),
            None => p.matmul(h, self.embed.weight.val().transpose().unsqueeze::<3>()),
        }
    }
}

impl Layer {
    /// New tokens at positions `pos ..` (s per sequence): the layer's output, attention
    /// through the layer's decoding state (append, select, attend).
    fn decode(
        &self,
        cfg: &LmConfig,
        rope: &RotaryEncoding,
        x: Tensor<3>,
        pos: usize,
        state: &crate::train::generate::DecodeCfg,
    ) -> Tensor<3> {
        use crate::train::ops::AttnBackend;
        use burn::backend::Dispatch;
        let [b, s, _] = x.dims();
        let (hq, hkv, dh) = (cfg.heads_q, cfg.heads_kv, cfg.head_dim());
        let h = rms_norm(&self.norm1, x.clone());
        let heads = |t: Tensor<3>, n: usize| t.reshape([b, s, n, dh]).swap_dims(1, 2);
        let q = self::rope(rope, heads(self.wq.forward(h.clone()), hq), pos);
        let k = self::rope(rope, heads(self.wk.forward(h.clone()), hkv), pos);
        let vflat = self.wv.forward(h.clone());
        let v = heads(vflat.clone(), hkv);
        let gate = self.wg.as_ref().map(|g| sigmoid(heads(g.forward(h), hq)));
        let bias = self.evict.as_ref().map(|e| e.forward(vflat));
        let o = match bias {
            Some(bias) => <Dispatch as AttnBackend>::sa_decode_bias(
                q.into_dispatch(),
                k.into_dispatch(),
                v.into_dispatch(),
                bias.into_dispatch(),
                state.clone(),
            ),
            None => <Dispatch as AttnBackend>::sa_decode(
                q.into_dispatch(),
                k.into_dispatch(),
                v.into_dispatch(),
                state.clone(),
            ),
        };
        let att = gated(gate, Tensor::<4>::from_dispatch(o));
        let att = att.swap_dims(1, 2).reshape([b, s, hq * dh]);
        let x = x + self.wo.forward(att);
        let h = rms_norm(&self.norm2, x.clone());
        let mlp = self
            .w2
            .forward(silu(self.w1.forward(h.clone())) * self.w3.forward(h));
        x + mlp
    }

    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        cfg: &LmConfig,
        rope: &RotaryEncoding,
        x: Tensor<3>,
        b: usize,
        s: usize,
        run: Run,
        qk: &mut Vec<Captured>,
    ) -> Result<(Tensor<3>, Option<Tensor<1>>)> {
        let (hq, hkv, dh) = (cfg.heads_q, cfg.heads_kv, cfg.head_dim());
        let lin = |l: &Linear, x: Tensor<3>| linear(l, x, run.precision);
        let h = rms_norm(&self.norm1, x.clone());
        let heads = |t: Tensor<3>, n: usize| t.reshape([b, s, n, dh]).swap_dims(1, 2);
        let q = self::rope(rope, heads(lin(&self.wq, h.clone()), hq), 0);
        let k = self::rope(rope, heads(lin(&self.wk, h.clone()), hkv), 0);
        let vflat = lin(&self.wv, h.clone());
        let v = heads(vflat.clone(), hkv);
        let gate = self.wg.as_ref().map(|g| sigmoid(heads(lin(g, h), hq)));
        // NOSA's per-key bias (and eviction score), where the model has the head.
        let bias = self.evict.as_ref().map(|e| e.forward(vflat));
        if run.capture {
            qk.push(Captured {
                q: q.clone().detach(),
                k: k.clone().detach(),
                bias: bias.clone().map(|b| b.detach()),
            });
        }
        let opts = AttnOptions::causal(true);
        let sel_opts = cfg.select_options_for(s);
        // Attention reads and writes the run's precision (f16: our f16 kernels, on tensor
        // cores where the device has them); the selection reads f32 q and k. q, k, v are
        // stored once for both of SSA's streams.
        let p = run.precision;
        let (qa, ka, va) = (p.store(q.clone()), p.store(k.clone()), p.store(v));
        let back = |o: Tensor<4>| o.cast(FloatDType::F32);
        let full = |qa: Tensor<4>, ka: Tensor<4>, va: Tensor<4>| -> Result<Tensor<4>> {
            Ok(back(attention_with_bias(qa, ka, va, bias.clone(), opts)?.0))
        };
        let sparse = |qa: Tensor<4>, ka: Tensor<4>, va: Tensor<4>| -> Result<Tensor<4>> {
            let sel = select_for(q.clone(), k.clone(), bias.clone(), &sel_opts)?;
            Ok(back(
                sparse_attention_with_bias(qa, ka, va, sel, bias.clone(), &sel_opts)?.0,
            ))
        };
        let (att, align) = match run.mode {
            Mode::Full => (gated(gate, full(qa, ka, va)?), None),
            Mode::Sparse | Mode::Nosa => (gated(gate, sparse(qa, ka, va)?), None),
            Mode::Ssa | Mode::NosaSsa => {
                let hf = gated(gate.clone(), full(qa.clone(), ka.clone(), va.clone())?);
                let hs = gated(gate, sparse(qa, ka, va)?);
                let a = align_loss(hf.clone(), hs.clone(), 1.0)?;
                (if run.sparse_main { hs } else { hf }, Some(a))
            }
        };
        let att = att.swap_dims(1, 2).reshape([b, s, hq * dh]);
        let x = x + lin(&self.wo, att);
        let h = rms_norm(&self.norm2, x.clone());
        let mlp = lin(&self.w2, silu(lin(&self.w1, h.clone())) * lin(&self.w3, h));
        Ok((x + mlp, align))
    }
}

/// Attention output through the output gate, where the model has one.
fn gated(gate: Option<Tensor<4>>, o: Tensor<4>) -> Tensor<4> {
    match gate {
        Some(g) => g * o,
        None => o,
    }
}

/// Mean next-token cross-entropy of `logits` `[b, s, vocab]` against `targets` `[b, s]`.
pub fn cross_entropy(logits: Tensor<3>, targets: Tensor<2, Int>) -> Tensor<1> {
    let [b, s, v] = logits.dims();
    let lp = log_softmax(logits.reshape([b * s, v]), 1);
    let picked = lp.gather(1, targets.reshape([b * s, 1]));
    picked.mean().neg()
}
