//! `perplexity`: a pretrained GGUF model's validation perplexity with training-free sparse
//! attention: full attention against SSA, MoBA and InfLLM-V2 scoring and NOSA's split selection
//! (no eviction head) over budgets and context lengths, with each selection's decoding hit rate.
//! Prints a table; writes the JSON record and one plot per context. Needs `--features train`.

use std::process::ExitCode;

use sparse_attn::{Error, GpuOptions};

#[cfg(not(feature = "train"))]
pub use crate::train::TrainArgs as PerplexityArgs;

#[cfg(not(feature = "train"))]
pub fn perplexity_cmd(_: &GpuOptions, _: &PerplexityArgs) -> Result<ExitCode, Error> {
    Err(Error::NotBuilt(
        "`perplexity` runs a pretrained model, which needs the training stack (Burn); rebuild \
         with it: `cargo run --release --features train -- perplexity ...`"
            .into(),
    ))
}

#[cfg(feature = "train")]
#[derive(clap::Args)]
pub struct PerplexityArgs {
    #[command(flatten)]
    pub model: crate::args::GgufText,
    /// Context lengths in tokens.
    #[arg(long, value_delimiter = ',', default_values_t = vec![2048, 4096, 8192])]
    pub context: Vec<usize>,
    /// Sparse budgets: tokens a query sees (blocks x block size).
    #[arg(long, value_delimiter = ',', default_values_t = vec![256, 512, 1024, 2048, 4096])]
    pub budget: Vec<usize>,
    /// Selections: ssa, moba, infllm-v2, nosa.
    #[arg(long, value_delimiter = ',', default_values_t = vec!["ssa".to_string(), "moba".to_string(), "infllm-v2".to_string(), "nosa".to_string()])]
    pub selection: Vec<String>,
    /// Windows per context (consecutive, from the start of the held-out text).
    #[arg(long, default_value_t = 8)]
    pub windows: usize,
    #[arg(long, default_value_t = 64)]
    pub block: usize,
    /// Blocks always kept: the first n_init, and n_local before the current one.
    #[arg(long, default_value_t = 1)]
    pub n_init: usize,
    #[arg(long, default_value_t = 1)]
    pub n_local: usize,
    /// JSON record of every row.
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
    /// Folder for the plots (perplexity against budget, one PNG per context).
    #[arg(long)]
    pub plots: Option<std::path::PathBuf>,
}

#[cfg(feature = "train")]
pub fn perplexity_cmd(opts: &GpuOptions, a: &PerplexityArgs) -> Result<ExitCode, Error> {
    use sparse_attn::files::{prepare_dir, prepare_file, write_atomic};
    use sparse_attn::train::llama::SparseSettings;
    use sparse_attn::train::sweep::{Selection, SweepConfig, sweep};
    use sparse_attn::train::{Runtime, gpu_for};
    use sparse_attn::viz::{Series, line_plot};

    use crate::report::Table;

    let sc = SweepConfig {
        contexts: a.context.clone(),
        budgets: a.budget.clone(),
        selections: a
            .selection
            .iter()
            .map(|s| Selection::parse(s))
            .collect::<Result<_, _>>()?,
        windows: a.windows,
        block: a.block,
        n_init: a.n_init,
        n_local: a.n_local,
    };
    // Outputs are checked before the work.
    if let Some(p) = &a.out {
        prepare_file(p)?;
    }
    if let Some(d) = &a.plots {
        prepare_dir(d)?;
    }
    let corpus = a.model.corpus()?;
    let rt = Runtime::new(&Runtime::gpu_options(opts))?;
    let (p, tokens) = a
        .model
        .load(&corpus, &rt.device, SparseSettings::default())?;
    sc.validate(&p.config)?;
    let rows = sweep(&p.model, &p.config, &tokens, &sc, &rt.device, true)?;

    let mut head = vec!["selection", "budget", "|"];
    let ctx_names: Vec<String> = sc.contexts.iter().map(|c| format!("ppl @{c}")).collect();
    head.extend(ctx_names.iter().map(String::as_str));
    head.push("|");
    let hit_names: Vec<String> = sc.contexts.iter().map(|c| format!("hit @{c}")).collect();
    head.extend(hit_names.iter().map(String::as_str));
    let mut table = Table::new(&head);
    let mut keys: Vec<(Option<Selection>, Option<usize>)> = vec![(None, None)];
    for &s in &sc.selections {
        keys.extend(sc.budgets.iter().map(|&b| (Some(s), Some(b))));
    }
    for (sel, budget) in keys {
        let find = |c: usize| {
            rows.iter()
                .find(|r| r.context == c && r.selection == sel && r.budget == budget)
        };
        let mut cells = vec![
            sel.map_or("full", Selection::name).to_string(),
            budget.map_or("-".into(), |b| b.to_string()),
        ];
        cells.extend(
            sc.contexts
                .iter()
                .map(|&c| find(c).map_or("-".into(), |r| format!("{:.3}", r.ce.exp()))),
        );
        cells.extend(sc.contexts.iter().map(|&c| {
            find(c)
                .and_then(|r| r.hit_rate)
                .map_or("-".into(), |h| format!("{h:.3}"))
        }));
        table.row(cells);
    }
    table.print();
    println!(
        "Validation perplexity of {} on {} ({} windows per context, every token of each \
         window); '-': the budget covers the context. Hit rate: share of a token's selected \
         blocks that the token before it selected (first window, mean over layers).",
        a.model.gguf.display(),
        a.model.data.display(),
        a.windows
    );

    if let Some(dir) = &a.plots {
        for &c in &sc.contexts {
            let full = rows
                .iter()
                .find(|r| r.context == c && r.selection.is_none())
                .map(|r| r.ce.exp());
            let mut series = vec![];
            if let Some(f) = full {
                let (lo, hi) = (sc.budgets[0] as f64, *sc.budgets.last().unwrap() as f64);
                series.push(Series::new("full", vec![(lo.log2(), f), (hi.log2(), f)]));
            }
            for &s in &sc.selections {
                let pts = rows
                    .iter()
                    .filter(|r| r.context == c && r.selection == Some(s))
                    .map(|r| ((r.budget.unwrap() as f64).log2(), r.ce.exp()))
                    .collect();
                series.push(Series::new(s.name(), pts));
            }
            let path = dir.join(format!("perplexity-{c}.png"));
            line_plot(
                &format!("perplexity at context {c}, training-free sparse attention"),
                "log2 budget (tokens a query sees)",
                "perplexity",
                &series,
                &path,
            )?;
            eprintln!("plot: {}", path.display());
        }
    }
    if let Some(path) = &a.out {
        let gpu = gpu_for(&rt.device)?;
        let record = serde_json::json!({
            "command": "perplexity",
            "device": gpu.adapter().to_string(),
            "model": a.model.model_name(),
            "data": a.model.data.display().to_string(), "valid_every": a.model.valid_every,
            "held_out_tokens": tokens.len(), "windows": a.windows,
            "block": a.block, "n_init": a.n_init, "n_local": a.n_local,
            "rows": rows.iter().map(|r| r.to_json()).collect::<Vec<_>>(),
        });
        write_atomic(
            path,
            serde_json::to_string_pretty(&record).unwrap().as_bytes(),
        )?;
    }
    Ok(ExitCode::SUCCESS)
}
