//! Evaluation of a trained model, for full and sparse inference (PAPERS.md section 2):
//! validation perplexity; attention sparsity (share of the full attention mass inside the
//! selected blocks) and entropy per layer; a budget sweep (the trained top-k, then 2x, 4x, 8x);
//! length extrapolation (perplexity and pass-key accuracy at 1x, 2x, 4x the training length).

use std::path::Path;

use burn::tensor::{Device, Tensor};

use crate::error::{Error, Result, invalid};
use crate::reference::Rng;
use crate::train::data::{Batch, Corpus, passkey, sequential_batches};
use crate::train::model::{Captured, Lm, LmConfig, Mode, Run, cross_entropy};
use crate::train::ops::{attention_metrics, select_for};
use crate::train::trainer::{TrainConfig, batch_tensors};

/// What to measure.
#[derive(Clone, Debug)]
pub struct EvalConfig {
    /// Validation windows per measurement.
    pub windows: usize,
    pub batch: usize,
    /// Multiples of the trained top-k for the budget sweep.
    pub budgets: Vec<usize>,
    /// Multiples of the training length for extrapolation.
    pub lengths: Vec<usize>,
    /// Pass-key samples per length.
    pub passkeys: usize,
    /// Windows used for the attention metrics (they read q, k back to the host).
    pub metric_windows: usize,
    pub seed: u64,
}

/// Pass-key samples per length, at most.
pub const MAX_PASSKEYS: usize = 10_000;

impl EvalConfig {
    /// Counts at least 1, and every length multiple representable for a model trained on
    /// `seq` tokens (a product that overflows would wrap to a short length under its label).
    pub fn validate(&self, seq: usize) -> Result<()> {
        for (name, v) in [
            ("windows", self.windows),
            ("batch", self.batch),
            ("passkeys", self.passkeys),
            ("metric_windows", self.metric_windows),
        ] {
            if v == 0 {
                invalid!("{name} must be at least 1");
            }
        }
        if self.passkeys > MAX_PASSKEYS {
            invalid!(
                "passkeys = {} is more than {MAX_PASSKEYS} samples per length (they are made and \
                 scored one batch at a time: that many would run for days)",
                self.passkeys
            );
        }
        if self.budgets.is_empty() || self.budgets.contains(&0) {
            invalid!(
                "budgets must be multiples of at least 1, got {:?}",
                self.budgets
            );
        }
        if self.lengths.is_empty() || self.lengths.contains(&0) {
            invalid!(
                "lengths must be multiples of at least 1, got {:?}",
                self.lengths
            );
        }
        if let Some(m) = self.lengths.iter().find(|m| seq.checked_mul(**m).is_none()) {
            invalid!("length multiple {m} x {seq} tokens does not fit in a machine word");
        }
        Ok(())
    }
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            windows: 64,
            batch: 4,
            budgets: vec![1, 2, 4, 8],
            lengths: vec![1, 2, 4],
            passkeys: 32,
            metric_windows: 4,
            seed: 1234,
        }
    }
}

/// One inference setting: full attention, or sparse with `topk` blocks.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Inference {
    Full,
    Sparse { topk: usize },
}

impl Inference {
    pub fn name(&self) -> String {
        match self {
            Inference::Full => "full".into(),
            Inference::Sparse { topk } => format!("sparse-k{topk}"),
        }
    }
    fn apply(&self, cfg: &LmConfig) -> (LmConfig, Mode) {
        match *self {
            Inference::Full => (cfg.clone(), Mode::Full),
            Inference::Sparse { topk } => (cfg.with_topk(topk), Mode::Sparse),
        }
    }
}

fn nll(model: &Lm, cfg: &LmConfig, inf: Inference, batches: &[Batch], dev: &Device) -> Result<f64> {
    let (c, mode) = inf.apply(cfg);
    let (mut sum, mut n) = (0.0, 0usize);
    for b in batches {
        let (x, y) = batch_tensors(b, dev);
        let f = model.forward(&c, x, Run::new(mode))?;
        let ce = cross_entropy(f.logits, y).into_scalar::<f32>() as f64;
        sum += ce * b.batch as f64;
        n += b.batch;
    }
    if n == 0 {
        return Err(Error::InvalidInput(
            "the validation text is too short for one window".into(),
        ));
    }
    Ok(sum / n as f64)
}

/// Share of pass-key samples of `len` tokens whose five digits are all predicted (greedy,
/// teacher-forced) under `inf`.
#[allow(clippy::too_many_arguments)]
fn passkey_accuracy(
    model: &Lm,
    cfg: &LmConfig,
    inf: Inference,
    filler: &[u8],
    len: usize,
    count: usize,
    batch: usize,
    seed: u64,
    dev: &Device,
) -> Result<f64> {
    let (c, mode) = inf.apply(cfg);
    let mut rng = Rng::new(seed);
    let samples: Vec<_> = (0..count)
        .filter_map(|_| passkey(&mut rng, filler, len + 1))
        .collect();
    if samples.is_empty() {
        return Ok(f64::NAN);
    }
    let mut right = 0usize;
    for chunk in samples.chunks(batch.max(1)) {
        let b = Batch {
            batch: chunk.len(),
            seq: len,
            inputs: chunk
                .iter()
                .flat_map(|p| p.tokens[..len].iter().map(|&t| t as i32))
                .collect(),
            targets: chunk
                .iter()
                .flat_map(|p| p.tokens[1..].iter().map(|&t| t as i32))
                .collect(),
        };
        let (x, _) = batch_tensors(&b, dev);
        let f = model.forward(&c, x, Run::new(mode))?;
        let pred = host_vec::<i64>(f.logits.argmax(2).into_data().convert::<i64>())?;
        for (i, p) in chunk.iter().enumerate() {
            // Target position t predicts token t + 1.
            let ok = p
                .answer
                .clone()
                .all(|pos| pred[i * len + pos - 1] == p.tokens[pos] as i64);
            right += ok as usize;
        }
    }
    Ok(right as f64 / samples.len() as f64)
}

fn host_vec<E: burn::tensor::Element>(d: burn::tensor::TensorData) -> Result<Vec<E>> {
    d.try_to_vec::<E>()
        .map_err(|e| Error::Gpu(format!("reading a Burn tensor back: {e:?}")))
}

/// Per layer under `inf`, at the trained budget: mean attention sparsity, entropy and decoding
/// hit rate (share of a token's selected blocks that the previous token selected too).
struct LayerMetrics {
    sparsity: f64,
    entropy: f64,
    hit_rate: f64,
}

fn layer_metrics(
    model: &Lm,
    cfg: &LmConfig,
    inf: Inference,
    batches: &[Batch],
    dev: &Device,
) -> Result<Vec<LayerMetrics>> {
    let (c, mode) = inf.apply(cfg);
    let mut acc = vec![(0.0, 0.0, 0.0, 0usize); cfg.layers];
    for b in batches {
        let (x, _) = batch_tensors(b, dev);
        let f = model.forward(
            &c,
            x,
            Run {
                capture: true,
                ..Run::new(mode)
            },
        )?;
        for (l, cap) in f.qk.into_iter().enumerate() {
            let (s, e, h) = metrics_of(cfg, cap)?;
            acc[l].0 += s;
            acc[l].1 += e;
            acc[l].2 += h;
            acc[l].3 += 1;
        }
    }
    Ok(acc
        .into_iter()
        .map(|(s, e, h, n)| {
            let n = n.max(1) as f64;
            LayerMetrics {
                sparsity: s / n,
                entropy: e / n,
                hit_rate: h / n,
            }
        })
        .collect())
}

/// Mean sparsity and entropy of full attention over q, k given the trained-budget selection
/// (NOSA's where the model has an eviction head), and the selection's decoding hit rate:
/// selection and metrics run on Burn's own buffers; the two means and the selection (for the
/// hit rate) come back.
fn metrics_of(cfg: &LmConfig, cap: Captured) -> Result<(f64, f64, f64)> {
    let Captured { q, k, bias } = cap;
    let seq = k.dims()[2];
    let sel_opts = cfg.select_options_for(seq);
    let sel = select_for(q.clone(), k.clone(), bias, &sel_opts)?;
    let picked = host_vec::<u32>(sel.clone().into_data().convert::<u32>())?;
    let hit = crate::reference::select::hit_rate(&picked, seq, sel_opts.k).unwrap_or(1.0);
    let (sp, en) = attention_metrics(q, k, sel, &sel_opts)?;
    let mean = |t: Tensor<3>| -> Result<f64> {
        Ok(host_vec::<f32>(t.mean().into_data().convert::<f32>())?[0] as f64)
    };
    Ok((mean(sp)?, mean(en)?, hit))
}

/// Run every measurement; returns the JSON report.
pub fn evaluate(
    model: &Lm,
    train: &TrainConfig,
    corpus: &Corpus,
    dev: &Device,
    ec: &EvalConfig,
    progress: bool,
) -> Result<serde_json::Value> {
    let cfg = &train.model;
    let seq = train.seq;
    ec.validate(seq)?;
    // Batches of the training length must fit the device like the training steps did.
    cfg.check_fits(crate::train::gpu_for(dev)?.max_binding(), ec.batch, seq)?;
    let say = |s: &str| {
        if progress {
            eprintln!("{s}");
        }
    };
    let sparse = Inference::Sparse { topk: cfg.topk };
    let base = sequential_batches(&corpus.valid, ec.batch, seq, ec.windows);
    let mut ppl = serde_json::Map::new();
    for inf in [Inference::Full, sparse] {
        let ce = nll(model, cfg, inf, &base, dev)?;
        say(&format!(
            "{:>12}: valid ce {ce:.4} (ppl {:.3})",
            inf.name(),
            ce.exp()
        ));
        ppl.insert(inf.name(), serde_json::json!({"ce": ce, "ppl": ce.exp()}));
    }

    let mbatches = sequential_batches(&corpus.valid, ec.batch, seq, ec.metric_windows);
    let mut layers = serde_json::Map::new();
    for (name, inf) in [("full", Inference::Full), ("sparse", sparse)] {
        let m = layer_metrics(model, cfg, inf, &mbatches, dev)?;
        for (l, x) in m.iter().enumerate() {
            say(&format!(
                "{name:>12} inference, layer {l}: sparsity {:.4} entropy {:.4} hit rate {:.4}",
                x.sparsity, x.entropy, x.hit_rate
            ));
        }
        let col = |f: fn(&LayerMetrics) -> f64| m.iter().map(f).collect::<Vec<_>>();
        let mean = |f: fn(&LayerMetrics) -> f64| m.iter().map(f).sum::<f64>() / m.len() as f64;
        layers.insert(
            name.into(),
            serde_json::json!({
                "sparsity": col(|x| x.sparsity),
                "entropy": col(|x| x.entropy),
                "hit_rate": col(|x| x.hit_rate),
                "mean_sparsity": mean(|x| x.sparsity),
                "mean_entropy": mean(|x| x.entropy),
                "mean_hit_rate": mean(|x| x.hit_rate),
            }),
        );
    }

    let mut budgets = Vec::new();
    for &mult in &ec.budgets {
        // Saturating: a budget past the context is skipped, however large its multiple.
        let topk = cfg.topk.saturating_mul(mult);
        if topk.saturating_mul(cfg.block) > seq {
            say(&format!(
                "budget x{mult} ({topk} blocks) covers the whole context: skipped"
            ));
            continue;
        }
        let ce = nll(model, cfg, Inference::Sparse { topk }, &base, dev)?;
        say(&format!("budget x{mult} (k {topk}): sparse ce {ce:.4}"));
        budgets.push(serde_json::json!({"mult": mult, "topk": topk,
            "receptive_field": topk * cfg.block, "ce": ce, "ppl": ce.exp()}));
    }

    let mut lengths = Vec::new();
    for &mult in &ec.lengths {
        let len = seq * mult; // representable: checked by EvalConfig::validate
        if len > cfg.max_seq {
            say(&format!(
                "length x{mult} ({len}) exceeds max_seq {}: skipped",
                cfg.max_seq
            ));
            continue;
        }
        let windows = (ec.windows / mult).max(2);
        let batches = sequential_batches(&corpus.valid, (ec.batch / mult).max(1), len, windows);
        let mut row = serde_json::json!({"mult": mult, "len": len});
        for inf in [Inference::Full, sparse] {
            let ce = nll(model, cfg, inf, &batches, dev)?;
            let acc = passkey_accuracy(
                model,
                cfg,
                inf,
                &corpus.valid,
                len,
                ec.passkeys,
                (ec.batch / mult).max(1),
                ec.seed + mult as u64,
                dev,
            )?;
            say(&format!(
                "length x{mult} ({len}), {}: ce {ce:.4}, pass-key accuracy {acc:.3}",
                inf.name()
            ));
            row[inf.name()] = serde_json::json!({"ce": ce, "ppl": ce.exp(), "passkey": acc});
        }
        lengths.push(row);
    }
    Ok(serde_json::json!({
        "mode": train.mode.name(),
        "model": cfg.to_json(),
        "train_seq": seq,
        "eval": {"windows": ec.windows, "batch": ec.batch, "passkeys": ec.passkeys,
                 "metric_windows": ec.metric_windows, "seed": ec.seed},
        "perplexity": ppl,
        "layers": layers,
        // NOSA: the eviction head's learned scale A per layer and kv head (0 at the start).
        "evict_scales": model.evict_scales()?,
        "budgets": budgets,
        "lengths": lengths,
    }))
}

/// Plots of one or several reports (one series per report): budget sweep, extrapolation,
/// per-layer sparsity. Returns the files written.
pub fn plot_reports(reports: &[serde_json::Value], dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    use crate::viz::{Series, line_plot};
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::InvalidInput(format!("creating {}: {e}", dir.display())))?;
    // The mode, the precision of runs trained in another than f32, and the seed where two
    // runs would otherwise share a name (seed-to-seed comparisons).
    let base = |r: &serde_json::Value| {
        let mode = r["mode"].as_str().unwrap_or("?");
        match r["train_config"]["precision"].as_str() {
            Some(p) if p != "f32" => format!("{mode} {p}"),
            _ => mode.to_string(),
        }
    };
    let name = |r: &serde_json::Value| {
        let b = base(r);
        match reports.iter().filter(|o| base(o) == b).count() > 1 {
            true => format!("{b} seed {}", r["train_config"]["seed"]),
            false => b,
        }
    };
    let pts = |r: &serde_json::Value, list: &str, x: &str, y: &[&str]| -> Vec<(f64, f64)> {
        r[list]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|e| {
                        let mut v = &e[y[0]];
                        for k in &y[1..] {
                            v = &v[*k];
                        }
                        Some((e[x].as_f64()?, v.as_f64()?))
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut files = Vec::new();
    let mut plot = |file: &str, title: &str, xl: &str, yl: &str, series: Vec<Series>| {
        let p = dir.join(file);
        line_plot(title, xl, yl, &series, &p).map(|_| files.push(p))
    };
    plot(
        "budget.png",
        "Sparse inference vs budget",
        "receptive field (tokens)",
        "validation CE (nats/byte)",
        reports
            .iter()
            .map(|r| Series::new(name(r), pts(r, "budgets", "receptive_field", &["ce"])))
            .collect(),
    )?;
    let mut ext = Vec::new();
    for r in reports {
        ext.push(Series::new(
            format!("{}: full inf.", name(r)),
            pts(r, "lengths", "len", &["full", "ce"]),
        ));
        let k = r["model"]["topk"].as_u64().unwrap_or(0);
        ext.push(Series::new(
            format!("{}: sparse inf.", name(r)),
            pts(r, "lengths", "len", &[&format!("sparse-k{k}"), "ce"]),
        ));
    }
    plot(
        "extrapolation.png",
        "Length extrapolation",
        "evaluation length (tokens)",
        "validation CE (nats/byte)",
        ext,
    )?;
    let mut pk = Vec::new();
    for r in reports {
        let k = r["model"]["topk"].as_u64().unwrap_or(0);
        pk.push(Series::new(
            format!("{}: sparse inf.", name(r)),
            pts(r, "lengths", "len", &[&format!("sparse-k{k}"), "passkey"]),
        ));
        pk.push(Series::new(
            format!("{}: full inf.", name(r)),
            pts(r, "lengths", "len", &["full", "passkey"]),
        ));
    }
    plot(
        "passkey.png",
        "Pass-key retrieval",
        "evaluation length (tokens)",
        "accuracy",
        pk,
    )?;
    let log_series = |key: &str| -> Vec<Series> {
        reports
            .iter()
            .map(|r| {
                let pts = r["train_log"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|e| Some((e["step"].as_f64()?, e[key].as_f64()?)))
                            .collect()
                    })
                    .unwrap_or_default();
                Series::new(format!("{} {key}", name(r)), pts)
            })
            .collect()
    };
    let mut curves = log_series("valid_ce");
    curves.extend(log_series("ce"));
    plot("training.png", "Training", "step", "CE (nats/byte)", curves)?;
    let layer_series = |inf: &str| -> Vec<Series> {
        reports
            .iter()
            .map(|r| {
                let v = r["layers"][inf]["sparsity"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                Series::new(
                    name(r),
                    v.iter()
                        .enumerate()
                        .filter_map(|(i, x)| Some((i as f64, x.as_f64()?)))
                        .collect(),
                )
            })
            .collect()
    };
    plot(
        "sparsity-full.png",
        "Attention sparsity per layer (full inference)",
        "layer",
        "mass inside the selected blocks",
        layer_series("full"),
    )?;
    plot(
        "sparsity-sparse.png",
        "Attention sparsity per layer (sparse inference)",
        "layer",
        "mass inside the selected blocks",
        layer_series("sparse"),
    )?;
    Ok(files)
}

/// Columns of [`table_rows`].
pub const TABLE_HEAD: [&str; 11] = [
    "mode",
    "ppl full",
    "ppl sparse",
    "sparsity full inf.",
    "sparsity sparse inf.",
    "hit rate sparse inf.",
    "entropy",
    "ppl sparse x2 / x4 / x8 budget",
    "ppl full / sparse at 2x len",
    "at 4x len",
    "pass-key full / sparse 1x, 2x, 4x",
];

/// One row per report, the cells of [`TABLE_HEAD`] (the CLI prints them as a table).
pub fn table_rows(reports: &[serde_json::Value]) -> Vec<Vec<String>> {
    let f = |v: &serde_json::Value| v.as_f64().map_or("-".to_string(), |x| format!("{x:.3}"));
    let mut rows = Vec::new();
    for r in reports {
        let k = r["model"]["topk"].as_u64().unwrap_or(0);
        let sk = format!("sparse-k{k}");
        let budget = |m: u64| {
            r["budgets"]
                .as_array()
                .and_then(|a| a.iter().find(|e| e["mult"].as_u64() == Some(m)))
                .map_or("-".to_string(), |e| f(&e["ppl"]))
        };
        let len = |m: u64| -> Option<&serde_json::Value> {
            r["lengths"]
                .as_array()
                .and_then(|a| a.iter().find(|e| e["mult"].as_u64() == Some(m)))
        };
        let lp = |m: u64| {
            len(m).map_or("-".to_string(), |e| {
                format!("{} / {}", f(&e["full"]["ppl"]), f(&e[&sk]["ppl"]))
            })
        };
        let pk = |inf: &str| {
            [1, 2, 4]
                .iter()
                .map(|&m| len(m).map_or("-".to_string(), |e| f(&e[inf]["passkey"])))
                .collect::<Vec<_>>()
                .join(", ")
        };
        // The mode, and the block scoring where it is not the SSA default.
        let mode = r["mode"].as_str().unwrap_or("?");
        let label = match r["model"]["scoring"].as_str() {
            Some(sc) if sc != "ssa" => format!("{mode} ({sc})"),
            _ => mode.to_string(),
        };
        rows.push(vec![
            label,
            f(&r["perplexity"]["full"]["ppl"]),
            f(&r["perplexity"][&sk]["ppl"]),
            f(&r["layers"]["full"]["mean_sparsity"]),
            f(&r["layers"]["sparse"]["mean_sparsity"]),
            f(&r["layers"]["sparse"]["mean_hit_rate"]),
            f(&r["layers"]["full"]["mean_entropy"]),
            format!("{} / {} / {}", budget(2), budget(4), budget(8)),
            lp(2),
            lp(4),
            format!("{} / {}", pk("full"), pk(&sk)),
        ]);
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eval_config_refuses_zero_counts_and_overflowing_lengths() {
        assert!(EvalConfig::default().validate(1024).is_ok());
        let e = EvalConfig {
            lengths: vec![1, usize::MAX / 2],
            ..EvalConfig::default()
        };
        let msg = e.validate(1024).unwrap_err().to_string();
        assert!(msg.contains("does not fit"), "{msg}");
        assert!(e.validate(1).is_ok());
        for bad in [
            EvalConfig {
                windows: 0,
                ..EvalConfig::default()
            },
            EvalConfig {
                passkeys: MAX_PASSKEYS + 1,
                ..EvalConfig::default()
            },
            EvalConfig {
                lengths: vec![],
                ..EvalConfig::default()
            },
            EvalConfig {
                budgets: vec![2, 0],
                ..EvalConfig::default()
            },
        ] {
            assert!(bad.validate(64).is_err(), "{bad:?}");
        }
    }
}
