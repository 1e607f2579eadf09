//! The demo's model mode (feature `llm`): a GGUF model's own attention instead of synthetic
//! inputs. [`ModelSession::prefill`] tokenizes the visitor's text and runs the model on it
//! (`crate::llama`, full attention, every layer's q, k, v kept on the GPU) with a next-token
//! preview; [`ModelSession::view`] draws one layer and head of it through [`explore_qkv`] (full
//! against block-sparse at a budget, the same maps and numbers as the synthetic mode) and runs
//! the whole model again with block-sparse attention at that budget for the sparse model's
//! next-token preview. The page (`web/`) and `sparse-attn explore --gguf` call the same code.

use super::{ExploreConfig, explore_qkv};
use crate::error::{Error, Result, invalid};
use crate::gguf::Gguf;
use crate::gpu::Gpu;
use crate::llama::{ForwardOptions, LayerQkv, Llama, ModelAttention, top_tokens};
use crate::problem::Scoring;
use crate::tokenizer::Tokenizer;

/// Tokens shown in a next-token preview.
const TOP: usize = 5;

/// Which layer and head to draw, at which budget. Parsed from JSON by [`ModelView::from_json`].
#[derive(Clone, Debug, PartialEq)]
pub struct ModelView {
    pub layer: usize,
    pub head: usize,
    pub block: usize,
    pub topk: usize,
    pub n_init: usize,
    pub n_local: usize,
    pub scoring: Scoring,
}

impl Default for ModelView {
    fn default() -> Self {
        Self {
            layer: 0,
            head: 0,
            block: 16,
            topk: 4,
            n_init: 1,
            n_local: 1,
            scoring: Scoring::InfLlmV2,
        }
    }
}

impl ModelView {
    /// Fields missing from `json` keep their defaults; unknown fields or bad values are errors.
    pub fn from_json(json: &str) -> Result<Self> {
        let v: serde_json::Value = serde_json::from_str(json)
            .map_err(|e| Error::InvalidInput(format!("model view: {e}")))?;
        let Some(obj) = v.as_object() else {
            invalid!("model view: expected a JSON object");
        };
        let mut m = Self::default();
        for (key, val) in obj {
            let num = || {
                val.as_u64().map(|x| x as usize).ok_or_else(|| {
                    Error::InvalidInput(format!(
                        "model view: `{key}` must be a non-negative integer, got {val}"
                    ))
                })
            };
            match key.as_str() {
                "layer" => m.layer = num()?,
                "head" => m.head = num()?,
                "block" => m.block = num()?,
                "topk" => m.topk = num()?,
                "n_init" => m.n_init = num()?,
                "n_local" => m.n_local = num()?,
                "scoring" => m.scoring = super::parse_scoring(val, "model view")?,
                other => invalid!("model view: unknown field `{other}`"),
            }
        }
        Ok(m)
    }
}

struct Prefilled {
    tokens: Vec<u32>,
    layers: Vec<LayerQkv>,
    top_full: Vec<(u32, f64)>,
}

/// A model loaded for the demo, and its last prefill.
pub struct ModelSession {
    model: Llama,
    tokenizer: Tokenizer,
    prefill: Option<Prefilled>,
}

impl ModelSession {
    /// The model and tokenizer of the GGUF file `bytes`, the weights on `gpu`.
    pub fn load(gpu: &Gpu, bytes: &[u8]) -> Result<Self> {
        let tokenizer = Tokenizer::from_gguf(&Gguf::parse(bytes)?)?;
        let model = Llama::from_gguf(gpu, bytes)?;
        if tokenizer.vocab_size() != model.params.vocab {
            invalid!(
                "the tokenizer has {} tokens, the model {}",
                tokenizer.vocab_size(),
                model.params.vocab
            );
        }
        Ok(Self {
            model,
            tokenizer,
            prefill: None,
        })
    }

    /// The model's shape, for the page's controls.
    pub fn info(&self) -> serde_json::Value {
        let p = &self.model.params;
        serde_json::json!({
            "layers": p.layers, "d_model": p.d_model, "d_ff": p.d_ff, "heads": p.heads_q,
            "kv_heads": p.heads_kv, "head_dim": p.head_dim, "context": p.context,
            "vocab": p.vocab, "weight_bytes": self.model.weight_bytes(),
        })
    }

    fn top_json(&self, top: &[(u32, f64)]) -> Result<serde_json::Value> {
        top.iter()
            .map(|&(id, p)| {
                let text = self.tokenizer.decode(&[id], false)?;
                Ok(serde_json::json!({"id": id, "text": text, "p": p}))
            })
            .collect::<Result<Vec<_>>>()
            .map(serde_json::Value::Array)
    }

    /// Tokenize `text` and run the model over it with full attention, keeping every layer's
    /// q, k, v for [`Self::view`]. Resolves to the tokens (as text pieces) and the next-token
    /// preview.
    pub async fn prefill(&mut self, gpu: &Gpu, text: &str) -> Result<serde_json::Value> {
        let tokens = self.tokenizer.encode(text)?;
        // The page draws a row per token (ExploreConfig's limit).
        let max = 4096.min(self.model.params.context);
        if tokens.is_empty() || tokens.len() > max {
            invalid!(
                "the text makes {} tokens; the demo takes 1 to {max}",
                tokens.len()
            );
        }
        self.prefill = None;
        let mut enc = gpu.encoder();
        let opts = ForwardOptions {
            keep_qkv: true,
            ..ForwardOptions::new()
        };
        let f = self.model.forward(gpu, &mut enc, &tokens, &opts)?;
        gpu.queue().submit([enc.finish()]);
        let logits = gpu.read_async(&f.logits).await?;
        let top_full = top_tokens(&logits, TOP);
        let pieces = tokens
            .iter()
            .map(|&t| self.tokenizer.decode(&[t], false))
            .collect::<Result<Vec<_>>>()?;
        let j = serde_json::json!({
            "tokens": tokens.len(), "pieces": pieces, "top_full": self.top_json(&top_full)?,
        });
        self.prefill = Some(Prefilled {
            tokens,
            layers: f.layers,
            top_full,
        });
        Ok(j)
    }

    /// The explore config of `v` over the prefilled text.
    pub fn explore_config(&self, v: &ModelView) -> Result<ExploreConfig> {
        let Some(pre) = &self.prefill else {
            invalid!("no text yet: run the prefill first");
        };
        let p = &self.model.params;
        if v.layer >= p.layers {
            invalid!(
                "layer {} is out of range (the model has {})",
                v.layer,
                p.layers
            );
        }
        let cfg = ExploreConfig {
            seq: pre.tokens.len(),
            heads: p.heads_q,
            kv_heads: p.heads_kv,
            head_dim: p.head_dim,
            block: v.block,
            topk: v.topk,
            n_init: v.n_init,
            n_local: v.n_local,
            scoring: v.scoring,
            head: v.head,
            ..ExploreConfig::default()
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Layer `v.layer`, head `v.head` of the prefilled text: full against block-sparse
    /// attention at `v`'s budget (the synthetic mode's JSON with `layer`), and the next-token
    /// previews of the model with full and with block-sparse attention in every layer.
    pub async fn view(&self, gpu: &Gpu, v: &ModelView, timing: bool) -> Result<serde_json::Value> {
        let cfg = self.explore_config(v)?;
        let pre = self.prefill.as_ref().expect("checked by explore_config");
        let l = &pre.layers[v.layer];
        let r = explore_qkv(gpu, &cfg, [&l.q, &l.k, &l.v], timing).await?;
        let mut enc = gpu.encoder();
        let opts = ForwardOptions {
            attention: ModelAttention::Sparse(cfg.select_options()),
            ..ForwardOptions::new()
        };
        let f = self.model.forward(gpu, &mut enc, &pre.tokens, &opts)?;
        gpu.queue().submit([enc.finish()]);
        let top_sparse = top_tokens(&gpu.read_async(&f.logits).await?, TOP);
        let mut j = r.to_json();
        let o = j.as_object_mut().expect("explore's JSON is an object");
        o.insert("layer".into(), v.layer.into());
        o.insert("top_full".into(), self.top_json(&pre.top_full)?);
        o.insert("top_sparse".into(), self.top_json(&top_sparse)?);
        Ok(j)
    }
}
