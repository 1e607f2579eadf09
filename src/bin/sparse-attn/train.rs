//! `train`, `eval` and `bench train`: the training stack (Burn on its wgpu backend), built with
//! `--features train`. Without it the commands exist and say how to get them.

use std::process::ExitCode;

#[cfg(feature = "train")]
use crate::report::Table;
#[cfg(feature = "train")]
use clap::Args;
use sparse_attn::{Error, GpuOptions};

#[cfg(not(feature = "train"))]
mod missing {
    use super::*;

    /// What `train`, `eval` and `bench train` take; this build has no training stack.
    #[derive(clap::Args)]
    pub struct Rest {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
        pub args: Vec<String>,
    }

    pub fn unavailable(cmd: &str) -> Result<ExitCode, Error> {
        Err(Error::NotBuilt(format!(
            "`{cmd}` needs the training stack (Burn), which the default build leaves out to \
             build in minutes; rebuild with it: `cargo run --release --features train -- {cmd} \
             ...`"
        )))
    }
}

#[cfg(not(feature = "train"))]
pub use missing::Rest as TrainArgs;
#[cfg(not(feature = "train"))]
pub use missing::Rest as EvalArgs;
#[cfg(not(feature = "train"))]
pub use missing::Rest as BenchTrainArgs;

#[cfg(not(feature = "train"))]
pub fn train_cmd(_: &GpuOptions, _: &TrainArgs) -> Result<ExitCode, Error> {
    missing::unavailable("train")
}

#[cfg(not(feature = "train"))]
pub fn eval_cmd(_: &GpuOptions, _: &EvalArgs) -> Result<ExitCode, Error> {
    missing::unavailable("eval")
}

#[cfg(not(feature = "train"))]
pub fn bench_train_cmd(_: &GpuOptions, _: &BenchTrainArgs) -> Result<ExitCode, Error> {
    missing::unavailable("bench train")
}

#[cfg(feature = "train")]
#[derive(Args)]
pub struct EvalArgs {
    /// Checkpoint folders (from `train --out`); several are compared in one table and plot.
    #[arg(long, num_args = 1.., required_unless_present = "reports")]
    pub ckpt: Vec<std::path::PathBuf>,
    /// Instead of evaluating: combine JSON reports written by earlier `eval` runs into one
    /// table, report and set of plots (no GPU needed).
    #[arg(long, num_args = 1.., conflicts_with = "ckpt")]
    pub reports: Vec<std::path::PathBuf>,
    #[arg(long, default_value = "data/shakespeare")]
    pub data: std::path::PathBuf,
    #[arg(long, default_value_t = 10)]
    pub valid_every: usize,
    /// JSON report.
    #[arg(long, default_value = "eval.json")]
    pub out: std::path::PathBuf,
    /// Folder for the PNG plots.
    #[arg(long, default_value = "eval-plots")]
    pub plots: std::path::PathBuf,
    /// Validation windows per measurement.
    #[arg(long, default_value_t = 64)]
    pub windows: usize,
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Pass-key samples per length.
    #[arg(long, default_value_t = 32)]
    pub passkeys: usize,
    /// Multiples of the trained top-k.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    pub budgets: Vec<usize>,
    /// Multiples of the training length.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    pub lengths: Vec<usize>,
    #[arg(long, default_value_t = 4)]
    pub metric_windows: usize,
}

#[cfg(feature = "train")]
#[derive(Args)]
pub struct TrainArgs {
    /// full, sparse (sparse-only), ssa (both streams, aligned), nosa (sparse-only with NOSA's
    /// eviction head and selection) or nosa-ssa (SSA's streams with NOSA's sparse stream).
    #[arg(long)]
    pub mode: String,
    /// Folder of .txt files (scripts/fetch-corpus.sh makes data/shakespeare).
    #[arg(long, default_value = "data/shakespeare")]
    pub data: std::path::PathBuf,
    /// Every N-th file (sorted by name, from the first) is validation text.
    #[arg(long, default_value_t = 10)]
    pub valid_every: usize,
    /// Checkpoint folder.
    #[arg(long)]
    pub out: std::path::PathBuf,
    /// Continue the checkpoint in --out (same model, mode and seed).
    #[arg(long)]
    pub resume: bool,
    /// Stop (with a checkpoint) after this many steps of this invocation.
    #[arg(long)]
    pub stop_after: Option<usize>,
    /// Stop (with a checkpoint) after this many seconds; --resume continues.
    #[arg(long, value_parser = crate::report::positive_f64)]
    pub time_limit: Option<f64>,
    #[command(flatten)]
    pub run: RunArgs,
}

/// Model and optimisation settings shared by `train` and `bench train`.
#[cfg(feature = "train")]
#[derive(Args)]
pub struct RunArgs {
    #[arg(long, default_value_t = 1000)]
    pub steps: usize,
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Training context (tokens = bytes).
    #[arg(long, default_value_t = 1024)]
    pub seq: usize,
    #[arg(long, default_value_t = 256)]
    pub d_model: usize,
    #[arg(long, default_value_t = 6)]
    pub layers: usize,
    #[arg(long, default_value_t = 8)]
    pub heads: usize,
    #[arg(long, default_value_t = 2)]
    pub kv_heads: usize,
    /// MLP width (default: 8/3 d_model rounded up to a multiple of 64).
    #[arg(long)]
    pub d_ff: Option<usize>,
    /// Longest sequence RoPE covers (evaluation extrapolates up to it). Default 4 x --seq.
    #[arg(long)]
    pub max_seq: Option<usize>,
    /// Sparse attention: block size and blocks kept (receptive field = block x topk).
    #[arg(long, default_value_t = 16)]
    pub block: usize,
    #[arg(long, default_value_t = 16)]
    pub topk: usize,
    /// Block scoring of the selector: ssa, moba or infllm-v2 (default: infllm-v2 for the
    /// NOSA modes, ssa otherwise).
    #[arg(long)]
    pub scoring: Option<String>,
    /// Forced initial blocks (default: 1 for the NOSA modes, else 0).
    #[arg(long)]
    pub n_init: Option<usize>,
    /// Forced local blocks before the current one (default: topk / 8 for the NOSA modes,
    /// else 0).
    #[arg(long)]
    pub n_local: Option<usize>,
    /// NOSA modes: blocks chosen by the query besides the forced ones; the rest of topk is
    /// chosen by the eviction head (default: topk / 4, the official 16 of 64).
    #[arg(long)]
    pub k_query: Option<usize>,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 1e-4)]
    pub min_lr: f64,
    #[arg(long, default_value_t = 100)]
    pub warmup: usize,
    #[arg(long, default_value_t = 0.1)]
    pub weight_decay: f32,
    /// Per-parameter gradient-norm clip.
    #[arg(long, default_value_t = 1.0)]
    pub clip: f32,
    /// SSA: weight of the alignment loss.
    #[arg(long, default_value_t = 10.0)]
    pub alpha: f32,
    /// Share of training windows that are pass-key samples.
    #[arg(long, default_value_t = 0.05)]
    pub passkey_rate: f64,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[arg(long, default_value_t = 200)]
    pub eval_every: usize,
    #[arg(long, default_value_t = 32)]
    pub eval_windows: usize,
    #[arg(long, default_value_t = 200)]
    pub ckpt_every: usize,
    /// Operands of the linear layers' products: f32, or f16 (f32 master weights, norms,
    /// attention and loss; dynamic loss scaling). Tensor cores need the burn-vulkan build.
    #[arg(long, default_value = "f32")]
    pub precision: String,
}

#[cfg(feature = "train")]
impl RunArgs {
    pub fn config(&self, mode: &str) -> Result<sparse_attn::train::TrainConfig, Error> {
        use sparse_attn::Scoring;
        use sparse_attn::train::{LmConfig, Mode, TrainConfig};
        let a = self;
        let mode = Mode::parse(mode)?;
        let nosa = mode.nosa();
        let cfg = TrainConfig {
            model: LmConfig {
                vocab: sparse_attn::train::data::VOCAB,
                d_model: a.d_model,
                layers: a.layers,
                heads_q: a.heads,
                heads_kv: a.kv_heads,
                d_ff: a.d_ff.unwrap_or((a.d_model * 8 / 3).div_ceil(64) * 64),
                max_seq: a.max_seq.unwrap_or(4 * a.seq),
                rope_theta: 10000.0,
                block: a.block,
                topk: a.topk,
                scoring: match &a.scoring {
                    Some(s) => sparse_attn::problem::Scoring::parse(s)?,
                    None if nosa => Scoring::InfLlmV2,
                    None => Scoring::Ssa,
                },
                n_init: a.n_init.unwrap_or(nosa as usize),
                n_local: a.n_local.unwrap_or(if nosa { a.topk / 8 } else { 0 }),
                k_query: match (nosa, a.k_query) {
                    (true, k) => Some(k.unwrap_or(a.topk / 4)),
                    (false, None) => None,
                    (false, Some(_)) => {
                        return Err(Error::InvalidInput(
                            "--k-query is NOSA's budget: it needs --mode nosa or nosa-ssa".into(),
                        ));
                    }
                },
                gate: true,
                rms_eps: 1e-5,
            },
            mode,
            steps: a.steps,
            batch: a.batch,
            seq: a.seq,
            lr: a.lr,
            min_lr: a.min_lr,
            warmup: a.warmup,
            weight_decay: a.weight_decay,
            clip: a.clip,
            alpha: a.alpha,
            passkey_rate: a.passkey_rate,
            seed: a.seed,
            eval_every: a.eval_every,
            eval_windows: a.eval_windows,
            ckpt_every: a.ckpt_every,
            precision: sparse_attn::train::Precision::parse(&a.precision)?,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

#[cfg(feature = "train")]
#[derive(Args)]
pub struct BenchTrainArgs {
    /// Modes to time, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "full,sparse,ssa")]
    pub modes: Vec<String>,
    #[arg(long, default_value = "data/shakespeare")]
    pub data: std::path::PathBuf,
    /// Untimed steps first (pipeline compilation, autotuning).
    #[arg(long, default_value_t = 3)]
    pub warmup_steps: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 10)]
    pub timed_steps: usize,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub run: RunArgs,
}

#[cfg(feature = "train")]
pub fn train_cmd(opts: &GpuOptions, a: &TrainArgs) -> Result<ExitCode, Error> {
    use sparse_attn::train::{Runtime, data::Corpus, train};
    let cfg = a.run.config(&a.mode)?;
    let corpus = Corpus::load(&a.data, a.valid_every)?;
    let rt = Runtime::new(opts)?;
    // Before the summary line: an oversized model is refused, not described.
    cfg.model
        .check_fits(rt.gpu.max_binding(), cfg.batch, cfg.seq)?;
    eprintln!(
        "{} on {}: {:.1}M parameters, {} train / {} valid bytes ({} / {} files)",
        cfg.mode.name(),
        rt.gpu.adapter(),
        cfg.model.params() as f64 / 1e6,
        corpus.train.len(),
        corpus.valid.len(),
        corpus.train_files.len(),
        corpus.valid_files.len()
    );
    // Ctrl-C or a kill (SIGTERM) stops at the next step boundary with a checkpoint; a second
    // one ends the process at once (the last committed checkpoint stays intact).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, std::sync::atomic::Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\nstopping at the next step boundary with a checkpoint (again to abort)");
    })
    .map_err(|e| Error::Unsupported(format!("cannot handle SIGINT/SIGTERM here: {e}")))?;
    let inv = sparse_attn::train::trainer::Invocation {
        resume: a.resume,
        quiet: false,
        stop_after: a.stop_after,
        time_limit_s: a.time_limit,
        stop: Some(stop),
    };
    let log = train(&cfg, &corpus, &rt.device, &a.out, &inv)?;
    if let Some(last) = log.last() {
        println!(
            "{}",
            serde_json::json!({"mode": cfg.mode.name(), "step": last.step, "loss": last.loss,
                "ce": last.ce, "align": last.align, "tokens_per_s": last.tokens_per_s,
                "out": a.out.display().to_string()})
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(feature = "train")]
pub fn eval_cmd(opts: &GpuOptions, a: &EvalArgs) -> Result<ExitCode, Error> {
    use sparse_attn::files::{prepare_dir, prepare_file, write_atomic};
    use sparse_attn::train::eval::{EvalConfig, evaluate, plot_reports};
    use sparse_attn::train::{Runtime, data::Corpus, trainer::load};
    // Outputs and counts are checked before any work.
    prepare_file(&a.out)?;
    prepare_dir(&a.plots)?;
    let write_report = |all: &serde_json::Value| {
        write_atomic(
            &a.out,
            serde_json::to_string_pretty(all).unwrap().as_bytes(),
        )
    };
    if !a.reports.is_empty() {
        let mut reports = Vec::new();
        let mut devices = Vec::new();
        for p in &a.reports {
            let text = std::fs::read_to_string(p)
                .map_err(|e| Error::InvalidInput(format!("reading {}: {e}", p.display())))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::InvalidInput(format!("{}: {e}", p.display())))?;
            let list = v["reports"].as_array().ok_or_else(|| {
                Error::InvalidInput(format!("{} is not an eval report", p.display()))
            })?;
            reports.extend(list.iter().cloned());
            devices.push(v["device"].clone());
        }
        write_report(&serde_json::json!({"devices": devices, "reports": reports}))?;
        let files = plot_reports(&reports, &a.plots)?;
        println!("{}", eval_table(&reports));
        for f in files {
            eprintln!("plot: {}", f.display());
        }
        return Ok(ExitCode::SUCCESS);
    }
    let ec = EvalConfig {
        windows: a.windows,
        batch: a.batch,
        budgets: a.budgets.clone(),
        lengths: a.lengths.clone(),
        passkeys: a.passkeys,
        metric_windows: a.metric_windows,
        ..EvalConfig::default()
    };
    // Counts here; the lengths again against each checkpoint's training length.
    ec.validate(1)?;
    let corpus = Corpus::load(&a.data, a.valid_every)?;
    let rt = Runtime::new(opts)?;
    let mut reports = Vec::new();
    for dir in &a.ckpt {
        let (model, cfg) = load(dir, &rt.device)?;
        eprintln!("== {} ({})", dir.display(), cfg.mode.name());
        let mut r = evaluate(&model, &cfg, &corpus, &rt.device, &ec, true)?;
        r["checkpoint"] = serde_json::json!(dir.display().to_string());
        // The training log (loss, validation loss, tokens/s by step) travels with the report.
        if let Ok(st) = sparse_attn::train::trainer::load_state(dir) {
            r["train_log"] = st["log"].clone();
            r["train_config"] = st["config"].clone();
        }
        reports.push(r);
    }
    write_report(&serde_json::json!({"device": rt.gpu.adapter().to_string(), "reports": reports}))?;
    let files = plot_reports(&reports, &a.plots)?;
    println!("{}", eval_table(&reports));
    eprintln!("report: {}", a.out.display());
    for f in files {
        eprintln!("plot: {}", f.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// Gaps between our dispatches that `bench train` lists per mode.
#[cfg(feature = "train")]
const GAPS_SHOWN: usize = 16;

#[cfg(feature = "train")]
pub fn bench_train_cmd(opts: &GpuOptions, a: &BenchTrainArgs) -> Result<ExitCode, Error> {
    use sparse_attn::train::{Runtime, data::Corpus, trainer::measure_steps};
    let corpus = Corpus::load(&a.data, 10)?;
    let rt = Runtime::new(opts)?;
    let mut rows = Vec::new();
    for m in &a.modes {
        let cfg = a.run.config(m)?;
        let t = measure_steps(
            &cfg,
            &corpus,
            &rt.device,
            &rt.gpu,
            a.warmup_steps,
            a.timed_steps,
        )?;
        eprintln!(
            "{:>6}: {:.1} ms/step, {:.0} tokens/s, our kernels {:.1} ms/step, host {:.1} ms/step",
            m,
            t.step_s * 1e3,
            t.tokens_per_s,
            t.ours_s() * 1e3,
            t.host_s * 1e3
        );
        rows.push((cfg, t));
    }
    let step = |mode: &str| {
        rows.iter()
            .find(|r| r.0.mode.name() == mode)
            .map(|r| r.1.step_s)
    };
    println!(
        "device: {}\nmodel: {:.1}M params, batch {} x seq {}, block {} topk {}\n",
        rt.gpu.adapter(),
        rows[0].0.model.params() as f64 / 1e6,
        a.run.batch,
        a.run.seq,
        a.run.block,
        a.run.topk
    );
    let mut table = Table::new(&[
        "mode",
        "ms/step",
        "tokens/s",
        "our kernels ms/step",
        "share of step",
        "host ms/step",
    ]);
    for (_, t) in &rows {
        table.row(vec![
            t.mode.name().to_string(),
            format!("{:.1}", t.step_s * 1e3),
            format!("{:.0}", t.tokens_per_s),
            format!("{:.1}", t.ours_s() * 1e3),
            format!("{:.0}%", 100.0 * t.ours_s() / t.step_s),
            format!("{:.1}", t.host_s * 1e3),
        ]);
    }
    println!("{}", table.markdown());
    if let (Some(ssa), Some(sp), Some(full)) = (step("ssa"), step("sparse"), step("full")) {
        println!(
            "\nSSA step cost: {:+.0}% over sparse-only, {:+.0}% over full",
            100.0 * (ssa / sp - 1.0),
            100.0 * (ssa / full - 1.0)
        );
    }
    for (_, t) in &rows {
        println!("\n{} kernels (ms/step, dispatches/step):", t.mode.name());
        for (l, s, n) in &t.ours {
            println!("  {l:<28} {:8.3} {n}", s * 1e3);
        }
        let gaps = t.gaps();
        if !gaps.is_empty() {
            // What lies between our dispatches: Burn's kernels, submissions and idle time.
            let total: f64 = gaps.iter().map(|g| g.1).sum();
            println!(
                "{} between our dispatches: {:.1} ms/step; largest (ms/step, times/step):",
                t.mode.name(),
                total * 1e3
            );
            for (l, s, n) in gaps.iter().take(GAPS_SHOWN) {
                println!("  {l:<60} {:8.3} {n}", s * 1e3);
            }
        }
    }
    if a.json {
        let j: Vec<_> = rows
            .iter()
            .map(|(c, t)| {
                serde_json::json!({"mode": t.mode.name(), "config": c.to_json(),
                    "step_s": t.step_s, "host_s": t.host_s, "tokens_per_s": t.tokens_per_s,
                    "ours_s": t.ours_s(),
                    "gaps": t.gaps().iter().map(|g| serde_json::json!({"between": g.0,
                        "s": g.1, "times": g.2})).collect::<Vec<_>>(),
                    "kernels": t.ours.iter().map(|k| serde_json::json!({"kernel": k.0,
                        "s": k.1, "dispatches": k.2})).collect::<Vec<_>>()})
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({"device": rt.gpu.adapter().to_string(), "rows": j})
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The comparison of eval reports, one row per model, as Markdown (pasted into docs/RESULTS.md).
#[cfg(feature = "train")]
fn eval_table(reports: &[serde_json::Value]) -> String {
    use sparse_attn::train::eval::{TABLE_HEAD, seed_curves, seed_table, table_rows};
    let mut t = Table::new(&TABLE_HEAD);
    for row in table_rows(reports) {
        t.row(row);
    }
    let mut out = t.markdown();
    // Runs that differ only in their seed: validation CE across seeds, step by step.
    let curves = seed_curves(reports);
    if !curves.is_empty() {
        let (head, rows) = seed_table(&curves);
        let head: Vec<&str> = head.iter().map(String::as_str).collect();
        let mut t = Table::new(&head);
        for row in rows {
            t.row(row);
        }
        out += "\n\nValidation CE across seeds:\n\n";
        out += &t.markdown();
    }
    out
}
