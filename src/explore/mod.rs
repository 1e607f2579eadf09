//! What the browser demo (`web/`) and `sparse-attn explore` compute: one attention problem
//! through full attention, block selection, block-sparse attention and the metrics, all on the
//! GPU, reduced to what a page shows. Async so the browser never blocks; native callers use
//! `pollster::block_on`. Both give the same numbers for the same configuration and seed.

#[cfg(feature = "llm")]
pub mod model;

use crate::error::{Result, invalid};
use crate::gpu::{DType, Gpu, Tensor};
use crate::ops::attention::FullAttention;
use crate::ops::metrics::AttentionMetrics;
use crate::ops::select::{BlockSelect, SelectInputs};
use crate::ops::sparse::SparseAttention;
use crate::problem::{AttnOptions, AttnShape};
use crate::problem::{Scoring, SelectOptions};
use crate::reference::Rng;
use crate::{FullConfig, SelectConfig, SparseConfig};
use crate::{Qkv, SparseInputs};

/// One demo problem (batch 1, causal). Parsed from JSON by [`ExploreConfig::from_json`].
#[derive(Clone, Debug, PartialEq)]
pub struct ExploreConfig {
    pub seq: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub block: usize,
    pub topk: usize,
    pub n_init: usize,
    pub n_local: usize,
    pub scoring: Scoring,
    pub seed: u64,
    /// Query head whose map, selection and sparsity strip are returned.
    pub head: usize,
    /// Inputs: "structured" (local + needle keys, see `synthetic::structured_qk_with`) or "random".
    pub structured: bool,
    /// Structured inputs: keys every query is drawn to (0..=64).
    pub needles: usize,
    /// Structured inputs: weight of the positional (local) component (0..=8).
    pub locality: f64,
}

impl Default for ExploreConfig {
    fn default() -> Self {
        Self {
            seq: 512,
            heads: 4,
            kv_heads: 1,
            head_dim: 64,
            block: 16,
            topk: 8,
            n_init: 1,
            n_local: 1,
            scoring: Scoring::Ssa,
            seed: 42,
            head: 0,
            structured: true,
            needles: 6,
            locality: 2.5,
        }
    }
}

impl ExploreConfig {
    /// Fields missing from `json` keep their defaults; unknown fields or bad values are errors.
    pub fn from_json(json: &str) -> Result<Self> {
        let v: serde_json::Value = serde_json::from_str(json)
            .map_err(|e| crate::Error::InvalidInput(format!("explore config: {e}")))?;
        let Some(obj) = v.as_object() else {
            invalid!("explore config: expected a JSON object");
        };
        let mut c = Self::default();
        for (key, val) in obj {
            let num = || {
                val.as_u64().ok_or_else(|| {
                    crate::Error::InvalidInput(format!(
                        "explore config: `{key}` must be a non-negative integer, got {val}"
                    ))
                })
            };
            match key.as_str() {
                "seq" => c.seq = num()? as usize,
                "heads" => c.heads = num()? as usize,
                "kv_heads" => c.kv_heads = num()? as usize,
                "head_dim" => c.head_dim = num()? as usize,
                "block" => c.block = num()? as usize,
                "topk" => c.topk = num()? as usize,
                "n_init" => c.n_init = num()? as usize,
                "n_local" => c.n_local = num()? as usize,
                "seed" => c.seed = num()?,
                "head" => c.head = num()? as usize,
                "needles" => c.needles = num()? as usize,
                "locality" => {
                    c.locality = val.as_f64().ok_or_else(|| {
                        crate::Error::InvalidInput(format!(
                            "explore config: `locality` must be a number, got {val}"
                        ))
                    })?
                }
                "scoring" => c.scoring = parse_scoring(val, "explore config")?,
                "inputs" => {
                    c.structured = match val.as_str() {
                        Some("structured") => true,
                        Some("random") => false,
                        _ => invalid!("explore config: inputs must be structured or random"),
                    }
                }
                other => invalid!("explore config: unknown field `{other}`"),
            }
        }
        // A parsed config is a valid one (found by the property tests: `{"seq": 4097}`).
        c.validate()?;
        Ok(c)
    }

    pub fn shape(&self) -> AttnShape {
        AttnShape::new(1, self.heads, self.kv_heads, self.seq, self.head_dim)
    }

    pub fn select_options(&self) -> SelectOptions {
        SelectOptions {
            block: self.block,
            k: self.topk,
            n_init: self.n_init,
            n_local: self.n_local,
            scoring: self.scoring,
            causal: true,
            scale: None,
            evict: 0,
        }
    }

    /// Limits of the demo on top of the kernels' own checks (the page draws one row per token).
    pub fn validate(&self) -> Result<()> {
        if !(1..=4096).contains(&self.seq) {
            invalid!("seq = {} is outside the demo's range 1..=4096", self.seq);
        }
        if self.needles > 64 || !(0.0..=8.0).contains(&self.locality) {
            invalid!(
                "needles = {} and locality = {} must lie in 0..=64 and 0..=8",
                self.needles,
                self.locality
            );
        }
        if !(1..=64).contains(&self.heads) {
            // The inputs are made on the host (and in the browser's memory): keep them small.
            invalid!("heads = {} is outside the demo's range 1..=64", self.heads);
        }
        if self.head >= self.heads {
            invalid!(
                "head {} is out of range (heads = {})",
                self.head,
                self.heads
            );
        }
        self.shape().validate(&AttnOptions::causal(true))?;
        self.select_options().validate(&self.shape())
    }
}

/// A JSON value naming a scoring; the error names the config (`what`).
fn parse_scoring(val: &serde_json::Value, what: &str) -> Result<Scoring> {
    match val.as_str().map(Scoring::parse) {
        Some(Ok(s)) => Ok(s),
        _ => invalid!("{what}: scoring must be ssa, moba or infllm-v2, got {val}"),
    }
}

/// What one run computed, for the displayed head `cfg.head` (maps) and over all heads (means).
#[derive(Clone, Debug)]
pub struct Explore {
    pub config: ExploreConfig,
    pub adapter: String,
    /// Key blocks.
    pub blocks: usize,
    /// `[seq, blocks]`: full-attention mass of each key block for the displayed head.
    pub block_mass: Vec<f32>,
    /// `[seq, topk]`: the selection of the displayed head's kv group (u32::MAX = none).
    pub selection: Vec<u32>,
    /// `[seq]`: share of the displayed head's full attention mass inside its selected blocks.
    pub sparsity: Vec<f32>,
    /// Mean attention sparsity (kept mass) over all heads and tokens.
    pub mean_sparsity: f64,
    /// Mean attention entropy (nats) over all heads and tokens.
    pub mean_entropy: f64,
    /// Relative L2 error of the sparse output against the full output, all heads.
    pub output_error: f64,
    /// Mean share of the causal key blocks a token keeps.
    pub kept_blocks: f64,
    /// GPU milliseconds (timestamp queries), when the adapter has them.
    pub full_ms: Option<f64>,
    pub select_ms: Option<f64>,
    pub sparse_ms: Option<f64>,
}

/// The demo's inputs: q, k (structured or random) and v, from the seed alone.
pub fn inputs(cfg: &ExploreConfig) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let shape = cfg.shape();
    let (q, k) = if cfg.structured {
        crate::synthetic::structured_qk_with(&shape, cfg.seed, cfg.needles, cfg.locality as f32)
    } else {
        let mut rng = Rng::new(cfg.seed);
        (
            rng.normal_vec(shape.q_len(), 1.0),
            rng.normal_vec(shape.kv_len(), 1.0),
        )
    };
    let v = Rng::new(cfg.seed ^ 0x5eed_0f0a_1e00).normal_vec(shape.kv_len(), 1.0);
    (q, k, v)
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        num += (x as f64 - y as f64).powi(2);
        den += (y as f64).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

fn mean(x: &[f32]) -> f64 {
    x.iter().map(|&v| v as f64).sum::<f64>() / x.len().max(1) as f64
}

/// Run `cfg` on `gpu`; `timing` adds GPU timings (a few extra repetitions of each pass).
pub async fn explore(gpu: &Gpu, cfg: &ExploreConfig, timing: bool) -> Result<Explore> {
    cfg.validate()?;
    let shape = cfg.shape();
    let (q, k, v) = inputs(cfg);
    let [tq, tk, tv]: [Tensor; 3] = [
        gpu.upload(&shape.q_dims(), &q)?,
        gpu.upload(&shape.kv_dims(), &k)?,
        gpu.upload(&shape.kv_dims(), &v)?,
    ];
    explore_qkv(gpu, cfg, [&tq, &tk, &tv], timing).await
}

/// [`explore`] on given q `[1, heads, seq, d]`, k and v `[1, kv_heads, seq, d]` (a model's
/// layer, say) instead of the config's synthetic inputs.
pub async fn explore_qkv(
    gpu: &Gpu,
    cfg: &ExploreConfig,
    [tq, tk, tv]: [&Tensor; 3],
    timing: bool,
) -> Result<Explore> {
    cfg.validate()?;
    let shape = cfg.shape();
    let sel_opts = cfg.select_options();
    let full = FullAttention::new(gpu, shape, &FullConfig::new(AttnOptions::causal(true)))?;
    let selector = BlockSelect::new(gpu, shape, &SelectConfig::new(sel_opts))?;
    let sparse = SparseAttention::new(gpu, shape, &SparseConfig::for_selection(&sel_opts))?;
    let metrics = AttentionMetrics::new(gpu, shape, sel_opts.sparse(), sel_opts.k)?;
    let full_out = crate::ops::attention::AttnOutput::empty(gpu, &shape)?;
    let sparse_out = crate::ops::attention::AttnOutput::empty(gpu, &shape)?;
    let scratch = selector.scratch(gpu)?;
    let sel = gpu.empty(&selector.selection_dims(), DType::U32)?;
    let mut enc = gpu.encoder();
    full.encode_forward(gpu, &mut enc, Qkv::new(tq, tk, tv), &full_out)?;
    selector.encode(gpu, &mut enc, &SelectInputs::new(tq, tk), &scratch, &sel)?;
    sparse.encode_forward(
        gpu,
        &mut enc,
        &SparseInputs::new(tq, tk, tv, &sel),
        &sparse_out,
    )?;
    gpu.queue().submit([enc.finish()]);
    let m = metrics.compute(gpu, tq, tk, &sel)?;

    let nb = selector.blocks();
    let (sq, g) = (cfg.seq, shape.group());
    let kv = cfg.head / g;
    let o_full = gpu.read_async(&full_out.o).await?;
    let o_sparse = gpu.read_async(&sparse_out.o).await?;
    let mass = gpu.read_async(&m.block_mass).await?;
    let sparsity = gpu.read_async(&m.sparsity).await?;
    let entropy = gpu.read_async(&m.entropy).await?;
    let selection = gpu.read_u32_async(&sel).await?;
    let nsel = cfg.topk;
    let kept: f64 = (0..sq)
        .map(|t| {
            let cand = ((shape.q_offset() + t) / cfg.block + 1).min(nb);
            nsel.min(cand) as f64 / cand as f64
        })
        .sum::<f64>()
        / sq.max(1) as f64;

    let (mut full_ms, mut select_ms, mut sparse_ms) = (None, None, None);
    if timing {
        let reps = 5;
        full_ms = gpu
            .time_async(reps, |enc| {
                full.encode_forward(gpu, enc, Qkv::new(tq, tk, tv), &full_out)
            })
            .await?
            .map(|s| s * 1e3);
        select_ms = gpu
            .time_async(reps, |enc| {
                selector.encode(gpu, enc, &SelectInputs::new(tq, tk), &scratch, &sel)
            })
            .await?
            .map(|s| s * 1e3);
        sparse_ms = gpu
            .time_async(reps, |enc| {
                sparse.encode_forward(gpu, enc, &SparseInputs::new(tq, tk, tv, &sel), &sparse_out)
            })
            .await?
            .map(|s| s * 1e3);
    }
    Ok(Explore {
        config: cfg.clone(),
        adapter: gpu.adapter().to_string(),
        blocks: nb,
        block_mass: mass[cfg.head * sq * nb..(cfg.head + 1) * sq * nb].to_vec(),
        selection: selection[kv * sq * nsel..(kv + 1) * sq * nsel].to_vec(),
        sparsity: sparsity[cfg.head * sq..(cfg.head + 1) * sq].to_vec(),
        mean_sparsity: mean(&sparsity),
        mean_entropy: mean(&entropy),
        output_error: rel_l2(&o_sparse, &o_full),
        kept_blocks: kept,
        full_ms,
        select_ms,
        sparse_ms,
    })
}

impl Explore {
    /// Everything the page draws, as JSON (selection sentinels become -1).
    pub fn to_json(&self) -> serde_json::Value {
        let c = &self.config;
        serde_json::json!({
            "adapter": self.adapter,
            "seq": c.seq, "heads": c.heads, "kv_heads": c.kv_heads, "head_dim": c.head_dim,
            "block": c.block, "topk": c.topk, "n_init": c.n_init, "n_local": c.n_local,
            "seed": c.seed, "head": c.head, "needles": c.needles, "locality": c.locality,
            "scoring": c.scoring.name(),
            "blocks": self.blocks,
            "block_mass": self.block_mass,
            "selection": self.selection.iter()
                .map(|&s| if s == u32::MAX { -1 } else { s as i64 })
                .collect::<Vec<_>>(),
            "sparsity": self.sparsity,
            "mean_sparsity": self.mean_sparsity,
            "mean_entropy": self.mean_entropy,
            "output_error": self.output_error,
            "kept_blocks": self.kept_blocks,
            "full_ms": self.full_ms,
            "select_ms": self.select_ms,
            "sparse_ms": self.sparse_ms,
        })
    }
}
