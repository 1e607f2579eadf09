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

/// A report's run in a few words: its mode, and its precision where not f32.
fn run_label(r: &serde_json::Value) -> String {
    let mode = r["mode"].as_str().unwrap_or("?");
    match r["train_config"]["precision"].as_str() {
        Some(p) if p != "f32" => format!("{mode} {p}"),
        _ => mode.to_string(),
    }
}

/// Validation CE at one step across the seeds of a configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct SeedPoint {
    pub step: f64,
    /// Seeds with a validation CE at this step.
    pub seeds: usize,
    pub mean: f64,
    /// Sample standard deviation across those seeds (n - 1).
    pub sd: f64,
}

/// Runs that differ only in their seed, summarised per logged step.
#[derive(Clone, Debug, PartialEq)]
pub struct SeedCurve {
    pub label: String,
    /// Distinct seeds, and runs (a seed trained twice is a repeat: its runs are averaged
    /// first, so that it counts once).
    pub seeds: usize,
    pub runs: usize,
    pub points: Vec<SeedPoint>,
}

/// The reports grouped by training configuration without the seed; a curve for each group
/// with at least two seeds (the seed-to-seed noise that precision or mode comparisons need).
pub fn seed_curves(reports: &[serde_json::Value]) -> Vec<SeedCurve> {
    let config = |r: &serde_json::Value| {
        let mut c = r["train_config"].clone();
        if let Some(o) = c.as_object_mut() {
            o.remove("seed");
        }
        c
    };
    // (config, label, seed -> step -> valid CEs of its runs)
    type Runs = std::collections::BTreeMap<u64, std::collections::BTreeMap<u64, Vec<f64>>>;
    let mut groups: Vec<(serde_json::Value, String, Runs, usize)> = Vec::new();
    for r in reports {
        let (Some(seed), Some(log)) = (
            r["train_config"]["seed"].as_u64(),
            r["train_log"].as_array(),
        ) else {
            continue;
        };
        let c = config(r);
        let i = match groups.iter().position(|g| g.0 == c) {
            Some(i) => i,
            None => {
                groups.push((c, run_label(r), Runs::new(), 0));
                groups.len() - 1
            }
        };
        let g = &mut groups[i];
        g.3 += 1;
        let by_step = g.2.entry(seed).or_default();
        for e in log {
            if let (Some(step), Some(v)) = (e["step"].as_u64(), e["valid_ce"].as_f64()) {
                by_step.entry(step).or_default().push(v);
            }
        }
    }
    groups.retain(|g| g.2.len() >= 2);
    // Two configurations of one label (e.g. other learning rates) are told apart by number.
    let labels: Vec<String> = groups.iter().map(|g| g.1.clone()).collect();
    let mut out = Vec::new();
    for (i, (_, label, runs, n_runs)) in groups.into_iter().enumerate() {
        let label = match labels.iter().filter(|l| **l == label).count() > 1 {
            true => format!("{label} (config {})", i + 1),
            false => label,
        };
        let mut steps: std::collections::BTreeMap<u64, Vec<f64>> = Default::default();
        for by_step in runs.values() {
            for (&step, v) in by_step {
                steps
                    .entry(step)
                    .or_default()
                    .push(v.iter().sum::<f64>() / v.len() as f64);
            }
        }
        let points = steps
            .into_iter()
            .filter(|(_, v)| v.len() >= 2)
            .map(|(step, v)| {
                let n = v.len() as f64;
                let mean = v.iter().sum::<f64>() / n;
                let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
                SeedPoint {
                    step: step as f64,
                    seeds: v.len(),
                    mean,
                    sd: var.sqrt(),
                }
            })
            .collect();
        out.push(SeedCurve {
            label,
            seeds: runs.len(),
            runs: n_runs,
            points,
        });
    }
    out
}

/// The seed curves side by side: the head, then a row per step that every curve has: mean +-
/// sd (seeds) per curve, and for two curves the second's mean minus the first's with Welch's t
/// (the difference over its standard error; |t| below ~2 is within the seed-to-seed noise).
pub fn seed_table(curves: &[SeedCurve]) -> (Vec<String>, Vec<Vec<String>>) {
    let mut head = vec!["step".to_string()];
    head.extend(curves.iter().map(|c| {
        format!(
            "{}: mean +- sd ({} seeds, {} runs)",
            c.label, c.seeds, c.runs
        )
    }));
    let pair = curves.len() == 2;
    if pair {
        head.push(format!("{} - {}", curves[1].label, curves[0].label));
        head.push("Welch t".to_string());
    }
    let mut rows = Vec::new();
    let Some(first) = curves.first() else {
        return (head, rows);
    };
    for p in &first.points {
        let at: Vec<&SeedPoint> = curves
            .iter()
            .filter_map(|c| c.points.iter().find(|q| q.step == p.step))
            .collect();
        if at.len() != curves.len() {
            continue;
        }
        let mut row = vec![format!("{}", p.step)];
        row.extend(
            at.iter()
                .map(|q| format!("{:.4} +- {:.4} ({})", q.mean, q.sd, q.seeds)),
        );
        if pair {
            let (a, b) = (at[0], at[1]);
            let diff = b.mean - a.mean;
            let se = (a.sd.powi(2) / a.seeds as f64 + b.sd.powi(2) / b.seeds as f64).sqrt();
            row.push(format!("{diff:+.4}"));
            row.push(match se > 0.0 {
                true => format!("{:+.2}", diff / se),
                false => "-".to_string(),
            });
        }
        rows.push(row);
    }
    (head, rows)
}

/// Plots of one or several reports (one series per report): budget sweep, extrapolation,
/// per-layer sparsity. Returns the files written.
pub fn plot_reports(reports: &[serde_json::Value], dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    use crate::viz::{Series, line_plot};
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::InvalidInput(format!("creating {}: {e}", dir.display())))?;
    // The mode, the precision of runs trained in another than f32, and the seed where two
    // runs would otherwise share a name (seed-to-seed comparisons).
    let name = |r: &serde_json::Value| {
        let b = run_label(r);
        match reports.iter().filter(|o| run_label(o) == b).count() > 1 {
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
    let seeds = seed_curves(reports);
    if !seeds.is_empty() {
        let mut series = Vec::new();
        for (i, c) in seeds.iter().enumerate() {
            let line = |f: fn(&SeedPoint) -> f64| c.points.iter().map(|p| (p.step, f(p))).collect();
            let name = format!("{} ({} seeds)", c.label, c.seeds);
            series.push(Series::new(name, line(|p| p.mean)).styled(i, false));
            series.push(Series::new("", line(|p| p.mean + p.sd)).styled(i, true));
            series.push(Series::new("", line(|p| p.mean - p.sd)).styled(i, true));
        }
        plot(
            "training-seeds.png",
            "Validation CE across seeds: mean, dashed +- one sd",
            "step",
            "validation CE (nats/byte)",
            series,
        )?;
    }
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

    /// A report of a run of `precision` and `seed` whose validation CE at steps 100, 200, ...
    /// is `valid`.
    fn run(precision: &str, seed: u64, lr: f64, valid: &[f64]) -> serde_json::Value {
        let log: Vec<_> = valid
            .iter()
            .enumerate()
            .flat_map(|(i, v)| {
                let step = 100 * (i as u64 + 1);
                // Steps without a validation CE are in the log too.
                [
                    serde_json::json!({"step": step - 50, "ce": 9.0, "valid_ce": null}),
                    serde_json::json!({"step": step, "ce": 9.0, "valid_ce": v}),
                ]
            })
            .collect();
        serde_json::json!({"mode": "full", "train_log": log,
            "train_config": {"precision": precision, "seed": seed, "lr": lr}})
    }

    #[test]
    fn seed_curves_average_repeats_then_take_mean_and_sd_across_seeds() {
        let reports = [
            run("f32", 1, 1e-3, &[2.0, 1.5]),
            run("f32", 2, 1e-3, &[3.0, 1.7]),
            run("f16", 1, 1e-3, &[2.0, 1.6]),
            run("f16", 2, 1e-3, &[2.5, 1.8]),
            // A repeat of seed 2: averaged with it (2.5 and 3.5 -> 3.0), counted once.
            run("f16", 2, 1e-3, &[3.5]),
            // One seed of another configuration: no curve.
            run("f32", 1, 2e-3, &[1.0, 1.0]),
        ];
        let c = seed_curves(&reports);
        assert_eq!(c.len(), 2, "{c:?}");
        assert_eq!((c[0].label.as_str(), c[0].seeds, c[0].runs), ("full", 2, 2));
        assert_eq!(
            (c[1].label.as_str(), c[1].seeds, c[1].runs),
            ("full f16", 2, 3)
        );
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        let p = &c[0].points;
        assert_eq!(p.len(), 2);
        assert!(close(p[0].step, 100.0) && close(p[0].mean, 2.5), "{p:?}");
        assert!(close(p[0].sd, 0.5f64.sqrt()), "{p:?}"); // (0.25 + 0.25) / (2 - 1)
        assert!(
            close(p[1].mean, 1.6) && close(p[1].sd, 0.02f64.sqrt()),
            "{p:?}"
        );
        let q = &c[1].points;
        assert!(
            close(q[0].mean, 2.5) && close(q[0].sd, 0.5f64.sqrt()),
            "{q:?}"
        );
        assert!(close(q[1].mean, 1.7) && q[1].seeds == 2, "{q:?}");

        let (head, rows) = seed_table(&c);
        assert_eq!(head.len(), 5, "{head:?}");
        assert_eq!(head[3], "full f16 - full");
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0][0], "100");
        assert_eq!(rows[0][3], "+0.0000");
        // (1.7 - 1.6) / sqrt(0.02 / 2 + 0.02 / 2) = 0.71
        assert_eq!(rows[1][3], "+0.1000");
        assert_eq!(rows[1][4], "+0.71");

        // Same labels, other configurations: numbered.
        let two_lr = [
            run("f32", 1, 1e-3, &[2.0]),
            run("f32", 2, 1e-3, &[2.0]),
            run("f32", 1, 2e-3, &[2.0]),
            run("f32", 2, 2e-3, &[2.0]),
        ];
        let c = seed_curves(&two_lr);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].label, "full (config 1)");
        assert_eq!(c[1].label, "full (config 2)");
    }

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
