//! Training-free sparse attention on a pretrained model: validation perplexity at several
//! context lengths for full attention and for each block selection (SSA, MoBA and InfLLM-V2
//! scoring, NOSA's split selection without a trained eviction head) over a range of budgets,
//! with the decoding hit rate each selection would give (share of a token's blocks that the
//! token before it selected too: the blocks an offloaded cache already holds).

use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::error::{Error, Result, invalid};
use crate::problem::Scoring;
use crate::train::model::{Captured, Lm, LmConfig, Mode, Run};
use crate::train::ops::select_for;

/// How a sparse run picks its blocks.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Selection {
    Ssa,
    Moba,
    InfLlmV2,
    /// NOSA's selection (forced blocks, a third of the rest by the query, the others by the
    /// eviction score) with the eviction head as training starts it: every score 0, so those
    /// blocks go to the earliest candidates (ties to the lower index).
    Nosa,
}

impl Selection {
    pub const ALL: [Selection; 4] = [
        Selection::Ssa,
        Selection::Moba,
        Selection::InfLlmV2,
        Selection::Nosa,
    ];

    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "ssa" => Selection::Ssa,
            "moba" => Selection::Moba,
            "infllm-v2" => Selection::InfLlmV2,
            "nosa" => Selection::Nosa,
            _ => invalid!("unknown selection `{s}` (known: ssa, moba, infllm-v2, nosa)"),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Selection::Ssa => "ssa",
            Selection::Moba => "moba",
            Selection::InfLlmV2 => "infllm-v2",
            Selection::Nosa => "nosa",
        }
    }
}

/// What to measure.
#[derive(Clone, Debug)]
pub struct SweepConfig {
    /// Context lengths in tokens (each window holds one more token, the last target).
    pub contexts: Vec<usize>,
    /// Receptive fields in tokens (block · blocks per query); one at or past a context is
    /// left out there (sparse attention would be full attention).
    pub budgets: Vec<usize>,
    pub selections: Vec<Selection>,
    /// Windows per context, at most (consecutive, not overlapping).
    pub windows: usize,
    pub block: usize,
    /// Blocks always kept: the first ones and those before the current one.
    pub n_init: usize,
    pub n_local: usize,
}

impl Default for SweepConfig {
    fn default() -> Self {
        Self {
            contexts: vec![2048, 4096, 8192],
            budgets: vec![256, 512, 1024, 2048, 4096],
            selections: Selection::ALL.to_vec(),
            windows: 8,
            block: 64,
            n_init: 1,
            n_local: 1,
        }
    }
}

impl SweepConfig {
    pub fn validate(&self, cfg: &LmConfig) -> Result<()> {
        if self.contexts.is_empty() || self.budgets.is_empty() || self.windows == 0 {
            invalid!("the sweep needs at least one context, one budget and one window");
        }
        if let Some(c) = self.contexts.iter().find(|&&c| c < 2 || c > cfg.max_seq) {
            invalid!(
                "context {c} is outside 2..={} (the model's longest sequence)",
                cfg.max_seq
            );
        }
        let forced = self.n_init + self.n_local + 1;
        for &b in &self.budgets {
            if b == 0 || !b.is_multiple_of(self.block) || b / self.block <= forced {
                invalid!(
                    "budget {b} is not a multiple of the block ({}) with room for a chosen block \
                     besides the {forced} forced ones",
                    self.block
                );
            }
        }
        for sel in &self.selections {
            for &b in &self.budgets {
                self.config(cfg, *sel, b).validate()?;
            }
        }
        Ok(())
    }

    /// The model's configuration for `sel` at a receptive field of `budget` tokens.
    pub fn config(&self, base: &LmConfig, sel: Selection, budget: usize) -> LmConfig {
        let topk = budget / self.block;
        let free = topk.saturating_sub(self.n_init + self.n_local + 1);
        LmConfig {
            block: self.block,
            topk,
            scoring: match sel {
                Selection::Ssa => Scoring::Ssa,
                Selection::Moba => Scoring::Moba,
                Selection::InfLlmV2 | Selection::Nosa => Scoring::InfLlmV2,
            },
            n_init: self.n_init,
            n_local: self.n_local,
            // NOSA.md: 16 of the 47 free blocks by the query, 31 by the eviction score.
            k_query: (sel == Selection::Nosa).then(|| (free / 3).max(1)),
            ..base.clone()
        }
    }
}

/// One measurement.
#[derive(Clone, Debug)]
pub struct SweepRow {
    pub context: usize,
    /// `None`: full attention.
    pub selection: Option<Selection>,
    pub budget: Option<usize>,
    /// Mean cross-entropy (nats per token) over every position of the windows, and over the
    /// second half of each window (where the budget leaves more of the context out).
    pub ce: f64,
    pub ce_second_half: f64,
    /// Sparse runs: mean over layers of the decoding hit rate on the first window.
    pub hit_rate: Option<f64>,
}

impl SweepRow {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "context": self.context,
            "selection": self.selection.map_or("full", Selection::name),
            "budget": self.budget,
            "ce": self.ce, "ppl": self.ce.exp(),
            "ce_second_half": self.ce_second_half, "ppl_second_half": self.ce_second_half.exp(),
            "hit_rate": self.hit_rate,
        })
    }
}

/// Token log-likelihoods of `tokens` (one window: inputs `[..n]`, targets `[1..]`) under `cfg`
/// and `mode`: (sum over all positions, sum over the second half, captured q/k if asked).
fn window_nll(
    model: &Lm,
    cfg: &LmConfig,
    mode: Mode,
    window: &[u32],
    capture: bool,
    dev: &Device,
) -> Result<(f64, f64, Vec<Captured>)> {
    let n = window.len() - 1;
    let ids = |v: &[u32]| {
        Tensor::<2, Int>::from_data(
            TensorData::new(v.iter().map(|&t| t as i32).collect::<Vec<_>>(), [1, n]),
            dev,
        )
    };
    let (x, y) = (ids(&window[..n]), ids(&window[1..]));
    let f = model.forward(
        cfg,
        x,
        Run {
            capture,
            ..Run::new(mode)
        },
    )?;
    let [_, s, v] = f.logits.dims();
    let lp = log_softmax(f.logits.reshape([s, v]), 1).gather(1, y.reshape([s, 1]));
    let lp: Vec<f32> = lp
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .map_err(|e| Error::Gpu(format!("reading log-likelihoods back: {e:?}")))?;
    if let Some(i) = lp.iter().position(|x| !x.is_finite()) {
        return Err(Error::Gpu(format!(
            "the log-likelihood of position {i} is {} (not finite)",
            lp[i]
        )));
    }
    let all: f64 = lp.iter().map(|&x| -x as f64).sum();
    let half: f64 = lp[n / 2..].iter().map(|&x| -x as f64).sum();
    Ok((all, half, f.qk))
}

/// Mean over layers of the decoding hit rate of `cfg`'s selection on captured q and k.
fn hit_rate(cfg: &LmConfig, qk: Vec<Captured>) -> Result<f64> {
    let mut sum = 0.0;
    let layers = qk.len().max(1);
    for Captured { q, k, bias } in qk {
        let seq = k.dims()[2];
        let opts = cfg.select_options_for(seq);
        let sel = select_for(q, k, bias, &opts)?;
        let picked: Vec<u32> = sel
            .into_data()
            .convert::<u32>()
            .try_to_vec::<u32>()
            .map_err(|e| Error::Gpu(format!("reading a selection back: {e:?}")))?;
        sum += crate::reference::select::hit_rate(&picked, seq, opts.k).unwrap_or(1.0);
    }
    Ok(sum / layers as f64)
}

/// Run the sweep over the held-out `tokens`; `progress` prints each row as it comes.
pub fn sweep(
    model: &Lm,
    base: &LmConfig,
    tokens: &[u32],
    sc: &SweepConfig,
    dev: &Device,
    progress: bool,
) -> Result<Vec<SweepRow>> {
    sc.validate(base)?;
    let mut rows = Vec::new();
    for &ctx in &sc.contexts {
        let windows: Vec<&[u32]> = tokens.chunks_exact(ctx + 1).take(sc.windows).collect();
        if windows.is_empty() {
            invalid!(
                "the held-out text has {} tokens, fewer than one window of {}",
                tokens.len(),
                ctx + 1
            );
        }
        let mut runs: Vec<(Option<Selection>, Option<usize>)> = vec![(None, None)];
        for &sel in &sc.selections {
            for &b in sc.budgets.iter().filter(|&&b| b < ctx) {
                runs.push((Some(sel), Some(b)));
            }
        }
        for (sel, budget) in runs {
            let (cfg, mode) = match (sel, budget) {
                (Some(s), Some(b)) => (sc.config(base, s, b), Mode::Sparse),
                _ => (base.clone(), Mode::Full),
            };
            let (mut all, mut half, mut hit) = (0.0, 0.0, None);
            for (i, w) in windows.iter().enumerate() {
                let capture = i == 0 && sel.is_some();
                let (a, h, qk) = window_nll(model, &cfg, mode, w, capture, dev)?;
                all += a;
                half += h;
                if capture {
                    hit = Some(hit_rate(&cfg, qk)?);
                }
            }
            let n = windows.len() as f64;
            let row = SweepRow {
                context: ctx,
                selection: sel,
                budget,
                ce: all / (n * ctx as f64),
                ce_second_half: half / (n * (ctx - ctx / 2) as f64),
                hit_rate: hit,
            };
            if progress {
                eprintln!(
                    "context {ctx:>5} {:>9} budget {:>5}: ppl {:8.3} (second half {:8.3}){}",
                    sel.map_or("full", Selection::name),
                    budget.map_or("-".into(), |b| b.to_string()),
                    row.ce.exp(),
                    row.ce_second_half.exp(),
                    row.hit_rate
                        .map_or(String::new(), |h| format!(", hit rate {h:.3}"))
                );
            }
            rows.push(row);
        }
    }
    Ok(rows)
}
