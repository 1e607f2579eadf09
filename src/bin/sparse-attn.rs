//! `sparse-attn`: device info, benchmarks and a self-checking demo.

use std::process::ExitCode;
use std::time::Instant;

use clap::{Args, Parser, Subcommand, ValueEnum};
use sparse_attn::bench::{FullBench, bench_full, bench_sparse};
use sparse_attn::gpu::{self, DType, Gpu, GpuOptions, Reps, Storage};
use sparse_attn::ops::attention::{
    Variant, Variants, auto_variants, head_dim_supported, variant_supported,
};
use sparse_attn::ops::metrics::AttentionMetrics;
use sparse_attn::ops::select::{BlockSelect, TopK};
use sparse_attn::ops::sparse::{SparseAttention, SparseKernel};
use sparse_attn::reference::select::{Scoring, SelectOptions};
use sparse_attn::reference::sparse::SparseOptions;
use sparse_attn::reference::{self, Rng, compare};
use sparse_attn::{AttnOptions, AttnShape, Error, FullAttention};

#[derive(Parser)]
#[command(
    name = "sparse-attn",
    version,
    about = "Trainable sparse attention on any GPU (WebGPU)"
)]
struct Cli {
    /// Adapter to use: a backend (vulkan, metal, dx12, gl), a device type (discrete, integrated,
    /// cpu) or part of its name; several terms joined by commas. Default: SPARSE_ATTN_ADAPTER,
    /// else the best adapter (discrete > integrated > CPU, native APIs before GL).
    #[arg(long, global = true)]
    adapter: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Adapters, backend, features, limits, and which kernel variants this device runs.
    Info {
        #[arg(long)]
        json: bool,
    },
    /// Benchmark kernels (time, TFLOP/s, GB/s).
    Bench {
        #[command(subcommand)]
        which: BenchCmd,
    },
    /// Run attention on a sample input on the best device, check it against the f64 reference
    /// and print the error and the speed.
    Demo(DemoArgs),
    /// Draw where full attention goes, which blocks the selector keeps, and each token's kept
    /// share of the attention mass, as a PNG.
    Map(MapArgs),
    /// What the browser demo computes (web/), natively: full and sparse attention, selection and
    /// metrics for one configuration, as JSON. Same numbers as the page for the same config.
    Explore {
        /// JSON object; missing fields keep their defaults, e.g.
        /// '{"seq":512,"heads":4,"kv_heads":1,"head_dim":64,"block":16,"topk":8,"n_init":1,
        /// "n_local":1,"scoring":"ssa","seed":42,"head":0,"inputs":"structured"}'
        #[arg(long, default_value = "{}")]
        config: String,
        /// Also time the passes (GPU timestamps).
        #[arg(long)]
        timing: bool,
        /// Include the per-token arrays (block map, selection, sparsity strip).
        #[arg(long)]
        arrays: bool,
    },
    /// Check every kernel family on this device against the f64 references (small random
    /// inputs); exits non-zero when one is off. The browser demo runs the same check.
    Selfcheck {
        #[arg(long, default_value_t = 7)]
        seed: u64,
        #[arg(long)]
        json: bool,
    },
    /// Train a small Llama-style LM with full, sparse (MoBA-style) or SSA attention on our
    /// kernels (Burn on the wgpu backend); checkpoints to --out, --resume continues one.
    #[cfg(feature = "train")]
    Train(TrainArgs),
    /// Evaluate trained checkpoints, full and sparse inference: perplexity, per-layer attention
    /// sparsity and entropy, a budget sweep, length extrapolation with pass-key retrieval. Prints
    /// a table; writes the JSON report and PNG plots.
    #[cfg(feature = "train")]
    Eval(EvalArgs),
}

#[cfg(feature = "train")]
#[derive(Args)]
struct EvalArgs {
    /// Checkpoint folders (from `train --out`); several are compared in one table and plot.
    #[arg(long, num_args = 1.., required_unless_present = "reports")]
    ckpt: Vec<std::path::PathBuf>,
    /// Instead of evaluating: combine JSON reports written by earlier `eval` runs into one
    /// table, report and set of plots (no GPU needed).
    #[arg(long, num_args = 1.., conflicts_with = "ckpt")]
    reports: Vec<std::path::PathBuf>,
    #[arg(long, default_value = "data/shakespeare")]
    data: std::path::PathBuf,
    #[arg(long, default_value_t = 10)]
    valid_every: usize,
    /// JSON report.
    #[arg(long, default_value = "eval.json")]
    out: std::path::PathBuf,
    /// Folder for the PNG plots.
    #[arg(long, default_value = "eval-plots")]
    plots: std::path::PathBuf,
    /// Validation windows per measurement.
    #[arg(long, default_value_t = 64)]
    windows: usize,
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Pass-key samples per length.
    #[arg(long, default_value_t = 32)]
    passkeys: usize,
    /// Multiples of the trained top-k.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    budgets: Vec<usize>,
    /// Multiples of the training length.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    lengths: Vec<usize>,
    #[arg(long, default_value_t = 4)]
    metric_windows: usize,
}

#[cfg(feature = "train")]
#[derive(Args)]
struct TrainArgs {
    /// full, sparse (MoBA-style sparse-only) or ssa.
    #[arg(long)]
    mode: String,
    /// Folder of .txt files (scripts/fetch-corpus.sh makes data/shakespeare).
    #[arg(long, default_value = "data/shakespeare")]
    data: std::path::PathBuf,
    /// Every N-th file (sorted by name, from the first) is validation text.
    #[arg(long, default_value_t = 10)]
    valid_every: usize,
    /// Checkpoint folder.
    #[arg(long)]
    out: std::path::PathBuf,
    /// Continue the checkpoint in --out (same model, mode and seed).
    #[arg(long)]
    resume: bool,
    /// Stop (with a checkpoint) after this many steps of this invocation.
    #[arg(long)]
    stop_after: Option<usize>,
    /// Stop (with a checkpoint) after this many seconds; --resume continues.
    #[arg(long)]
    time_limit: Option<f64>,
    #[command(flatten)]
    run: RunArgs,
}

/// Model and optimisation settings shared by `train` and `bench train`.
#[cfg(feature = "train")]
#[derive(Args)]
struct RunArgs {
    #[arg(long, default_value_t = 1000)]
    steps: usize,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Training context (tokens = bytes).
    #[arg(long, default_value_t = 1024)]
    seq: usize,
    #[arg(long, default_value_t = 256)]
    d_model: usize,
    #[arg(long, default_value_t = 6)]
    layers: usize,
    #[arg(long, default_value_t = 8)]
    heads: usize,
    #[arg(long, default_value_t = 2)]
    kv_heads: usize,
    /// MLP width (default: 8/3 d_model rounded up to a multiple of 64).
    #[arg(long)]
    d_ff: Option<usize>,
    /// Longest sequence RoPE covers (evaluation extrapolates up to it). Default 4 x --seq.
    #[arg(long)]
    max_seq: Option<usize>,
    /// Sparse attention: block size and blocks kept (receptive field = block x topk).
    #[arg(long, default_value_t = 16)]
    block: usize,
    #[arg(long, default_value_t = 16)]
    topk: usize,
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    #[arg(long, default_value_t = 1e-4)]
    min_lr: f64,
    #[arg(long, default_value_t = 100)]
    warmup: usize,
    #[arg(long, default_value_t = 0.1)]
    weight_decay: f32,
    /// Per-parameter gradient-norm clip.
    #[arg(long, default_value_t = 1.0)]
    clip: f32,
    /// SSA: weight of the alignment loss.
    #[arg(long, default_value_t = 10.0)]
    alpha: f32,
    /// Share of training windows that are pass-key samples.
    #[arg(long, default_value_t = 0.05)]
    passkey_rate: f64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long, default_value_t = 200)]
    eval_every: usize,
    #[arg(long, default_value_t = 32)]
    eval_windows: usize,
    #[arg(long, default_value_t = 200)]
    ckpt_every: usize,
}

#[cfg(feature = "train")]
impl RunArgs {
    fn config(&self, mode: &str) -> Result<sparse_attn::train::TrainConfig, Error> {
        use sparse_attn::train::{LmConfig, Mode, TrainConfig};
        let a = self;
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
            },
            mode: Mode::parse(mode)?,
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
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

#[cfg(feature = "train")]
#[derive(Args)]
struct BenchTrainArgs {
    /// Modes to time, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "full,sparse,ssa")]
    modes: Vec<String>,
    #[arg(long, default_value = "data/shakespeare")]
    data: std::path::PathBuf,
    /// Untimed steps first (pipeline compilation, autotuning).
    #[arg(long, default_value_t = 3)]
    warmup_steps: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 10)]
    timed_steps: usize,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Args)]
struct MapArgs {
    /// Query head to draw (its kv group's selection is shown).
    #[arg(long, default_value_t = 0)]
    head: usize,
    /// Batch element to draw.
    #[arg(long, default_value_t = 0)]
    batch_index: usize,
    /// q from a file: `q.npy` (little-endian float32) or `acts.safetensors:NAME` (F32, F16,
    /// BF16 or F64); shape [batch, heads, seq, head_dim], [heads, seq, head_dim] or
    /// [seq, head_dim]. With --k. Default: structured random inputs.
    #[arg(long, requires = "k")]
    q: Option<String>,
    /// k from a file, as for --q (kv heads).
    #[arg(long, requires = "q")]
    k: Option<String>,
    /// Random inputs: sequence length.
    #[arg(long, default_value_t = 512)]
    seq: usize,
    /// Random inputs: query heads.
    #[arg(long, default_value_t = 4)]
    heads: usize,
    /// Random inputs: kv heads.
    #[arg(long, default_value_t = 1)]
    kv_heads: usize,
    /// Random inputs: head dim.
    #[arg(long, default_value_t = 64)]
    head_dim: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    #[command(flatten)]
    select: SelectArgs,
    /// Draw individual keys up to this many (block-level beyond).
    #[arg(long, default_value_t = 1024)]
    token_level_max: usize,
    /// Output PNG.
    #[arg(long, default_value = "attention-map.png")]
    out: std::path::PathBuf,
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Training throughput per mode (tokens/s), SSA's step cost over sparse-only and full, and
    /// the share of the step's GPU time spent in our attention kernels.
    #[cfg(feature = "train")]
    Train(BenchTrainArgs),
    /// Tiled full attention, forward and backward.
    Full(FullArgs),
    /// Block selection + block-sparse forward and backward against the dense causal kernels.
    Sparse(SparseArgs),
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum Mask {
    Causal,
    Full,
    Both,
}

/// Problem shapes of a benchmark sweep.
#[derive(Args)]
struct ShapeArgs {
    /// Batch size; default fills the GPU: max(1, 65536 / seq).
    #[arg(long)]
    batch: Option<usize>,
    /// Query heads.
    #[arg(long, default_value_t = 16)]
    heads: usize,
    /// Key/value heads (GQA); default = heads.
    #[arg(long)]
    kv_heads: Option<usize>,
    /// Sequence lengths (comma-separated list runs a sweep).
    #[arg(long, value_delimiter = ',', default_values_t = vec![4096])]
    seq: Vec<usize>,
    /// Head dims (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = vec![128])]
    head_dim: Vec<usize>,
}

impl ShapeArgs {
    fn shape(&self, seq: usize, d: usize) -> AttnShape {
        AttnShape::new(
            self.batch.unwrap_or((65536 / seq.max(1)).max(1)),
            self.heads,
            self.kv_heads.unwrap_or(self.heads),
            seq,
            d,
        )
    }
}

#[derive(Args)]
struct FullArgs {
    #[command(flatten)]
    shape: ShapeArgs,
    #[arg(long, value_enum, default_value_t = Mask::Causal)]
    mask: Mask,
    /// Kernel variants to time, comma-separated: all, auto (the library's choice per pass),
    /// portable, large, xl, coop (tensor cores, forward and backward; f16 only), coop-fwd (tensor
    /// cores forward, the largest f32-arithmetic tile backward). A prefix picks the storage: `f16:xl`, `f16p:portable` (f16 packed in u32
    /// words, what browsers without shader-f16 run), `f16:coop`, `f16:auto`; none = f32.
    #[arg(long, value_delimiter = ',', default_values_t = vec!["all".to_string()])]
    variant: Vec<String>,
    /// Skip the backward pass.
    #[arg(long)]
    no_backward: bool,
    /// Target seconds per timed submission (repetitions are chosen to fill it).
    #[arg(long, default_value_t = 0.5)]
    target_seconds: f64,
    #[command(flatten)]
    out: Output,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum ScoringArg {
    Ssa,
    Moba,
    InfllmV2,
}

/// How blocks are selected.
#[derive(Args)]
struct SelectArgs {
    /// Block size B (16, 32, 64, 128).
    #[arg(long, default_value_t = 16)]
    block: usize,
    /// Blocks kept per token and kv head (k), forced ones included.
    #[arg(long, default_value_t = 16)]
    topk: usize,
    /// Forced initial blocks.
    #[arg(long, default_value_t = 0)]
    n_init: usize,
    /// Forced local blocks before the current one.
    #[arg(long, default_value_t = 0)]
    n_local: usize,
    #[arg(long, value_enum, default_value_t = ScoringArg::Ssa)]
    scoring: ScoringArg,
}

impl SelectArgs {
    fn options(&self) -> SelectOptions {
        SelectOptions {
            block: self.block,
            k: self.topk,
            n_init: self.n_init,
            n_local: self.n_local,
            scoring: match self.scoring {
                ScoringArg::Ssa => Scoring::Ssa,
                ScoringArg::Moba => Scoring::Moba,
                ScoringArg::InfllmV2 => Scoring::InfLlmV2,
            },
            causal: true,
            scale: None,
        }
    }
}

#[derive(Args)]
struct SparseArgs {
    #[command(flatten)]
    shape: ShapeArgs,
    #[command(flatten)]
    select: SelectArgs,
    /// Skip the backward passes.
    #[arg(long)]
    no_backward: bool,
    /// Also time every kernel of the selection, sparse forward and backward on its own
    /// (timestamps around each dispatch).
    #[arg(long)]
    stages: bool,
    /// Target seconds per timed submission.
    #[arg(long, default_value_t = 0.3)]
    target_seconds: f64,
    /// Storage of q, k, v, O and gradients: f32 or f16 (f32 accumulation either way).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Sparse forward kernel: auto (the library's choice), portable, or coop (tensor cores:
    /// f16, up to 16 query heads per kv head, blocks of a multiple of 16).
    #[arg(long, default_value = "auto")]
    forward: String,
    /// Sparse backward kernels: auto, portable, or coop (tensor cores; same limits as the
    /// forward's).
    #[arg(long, default_value = "auto")]
    backward: String,
    /// Top-k kernel of the selection: auto (the library's choice), sort (bitonic, anywhere), or
    /// subgroup (subgroup arg-max rounds; needs subgroup operations).
    #[arg(long, default_value = "auto")]
    topk_kernel: String,
    #[command(flatten)]
    out: Output,
}

/// `f32` or `f16`.
fn parse_dtype(s: &str) -> Result<DType, Error> {
    match s {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        _ => Err(Error::InvalidInput(format!(
            "unknown dtype `{s}` (known: f32, f16)"
        ))),
    }
}

fn parse_kernel(s: &str) -> Result<SparseKernel, Error> {
    match s {
        "auto" => Ok(SparseKernel::Auto),
        "portable" => Ok(SparseKernel::Portable),
        "coop" => Ok(SparseKernel::Coop),
        _ => Err(Error::InvalidInput(format!(
            "unknown sparse kernel `{s}` (known: auto, portable, coop)"
        ))),
    }
}

#[derive(Args)]
struct DemoArgs {
    #[arg(long, default_value_t = 512)]
    seq: usize,
    #[arg(long, default_value_t = 8)]
    heads: usize,
    #[arg(long, default_value_t = 2)]
    kv_heads: usize,
    #[arg(long, default_value_t = 64)]
    head_dim: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let opts = GpuOptions {
        adapter: cli.adapter.clone(),
        ..Default::default()
    };
    let result = match cli.cmd {
        Cmd::Info { json } => info(&opts, json),
        Cmd::Bench {
            which: BenchCmd::Full(a),
        } => bench_full_cmd(&opts, &a),
        Cmd::Bench {
            which: BenchCmd::Sparse(a),
        } => bench_sparse_cmd(&opts, &a),
        #[cfg(feature = "train")]
        Cmd::Bench {
            which: BenchCmd::Train(a),
        } => bench_train_cmd(&opts, &a),
        Cmd::Demo(a) => demo(&opts, &a),
        Cmd::Map(a) => map(&opts, &a),
        Cmd::Explore {
            config,
            timing,
            arrays,
        } => explore(&opts, &config, timing, arrays),
        Cmd::Selfcheck { seed, json } => selfcheck(&opts, seed, json),
        #[cfg(feature = "train")]
        Cmd::Train(a) => train_cmd(&opts, &a),
        #[cfg(feature = "train")]
        Cmd::Eval(a) => eval_cmd(&opts, &a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

const SHOWN_FEATURES: [(wgpu::Features, &str); 5] = [
    (wgpu::Features::SHADER_F16, "shader-f16"),
    (wgpu::Features::SUBGROUP, "subgroups"),
    (wgpu::Features::TIMESTAMP_QUERY, "timestamp-query"),
    (
        wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS,
        "timestamp-query-inside-encoders",
    ),
    (
        wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX,
        "cooperative-matrix (experimental)",
    ),
];

fn info(opts: &GpuOptions, json: bool) -> Result<ExitCode, Error> {
    let adapters = gpu::list_adapters();
    let gpu = Gpu::new(opts)?;
    let l = gpu.limits();
    let feats: Vec<(&str, bool)> = SHOWN_FEATURES
        .iter()
        .map(|(f, n)| (*n, gpu.features().contains(*f)))
        .collect();
    let variants: Vec<(String, Result<(), Error>)> = Variant::ALL
        .iter()
        .chain(&[Variant::Coop])
        .flat_map(|&v| {
            [64usize, 128].map(|d| {
                (
                    format!("{} (head_dim {d})", v.name()),
                    if v == Variant::Coop {
                        sparse_attn::ops::coop::supported(&gpu, d)
                    } else {
                        variant_supported(&gpu, v, d)
                    },
                )
            })
        })
        .collect();
    let limits = [
        (
            "max_storage_buffer_binding_size",
            l.max_storage_buffer_binding_size,
        ),
        ("max_buffer_size", l.max_buffer_size),
        (
            "max_compute_workgroup_storage_size",
            l.max_compute_workgroup_storage_size as u64,
        ),
        (
            "max_compute_invocations_per_workgroup",
            l.max_compute_invocations_per_workgroup as u64,
        ),
        (
            "max_compute_workgroups_per_dimension",
            l.max_compute_workgroups_per_dimension as u64,
        ),
        (
            "min_storage_buffer_offset_alignment",
            l.min_storage_buffer_offset_alignment as u64,
        ),
        ("min_subgroup_size", gpu.adapter_subgroup_sizes().0 as u64),
        ("max_subgroup_size", gpu.adapter_subgroup_sizes().1 as u64),
    ];
    if json {
        let j = serde_json::json!({
            "adapter": gpu.adapter().name,
            "backend": format!("{:?}", gpu.adapter().backend),
            "device_type": format!("{:?}", gpu.adapter().device_type),
            "driver": format!("{} {}", gpu.adapter().driver, gpu.adapter().driver_info),
            "all_adapters": adapters.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "features": feats.iter().filter(|f| f.1).map(|f| f.0).collect::<Vec<_>>(),
            "limits": limits.iter().map(|(n, v)| (n.to_string(), serde_json::json!(v))).collect::<serde_json::Map<_, _>>(),
            "variants": variants.iter().map(|(n, r)| (n.clone(), serde_json::json!(match r { Ok(()) => "enabled".to_string(), Err(e) => e.to_string() }))).collect::<serde_json::Map<_, _>>(),
        });
        println!("{}", serde_json::to_string_pretty(&j).expect("json"));
        return Ok(ExitCode::SUCCESS);
    }
    println!("adapter:  {}", gpu.adapter());
    println!("adapters seen (best first):");
    for a in &adapters {
        println!("  - {a}");
    }
    println!("features:");
    for (n, on) in &feats {
        println!("  {:<36} {}", n, if *on { "yes" } else { "no" });
    }
    println!("limits:");
    for (n, v) in &limits {
        println!("  {n:<40} {v}");
    }
    println!("kernel variants:");
    for (n, r) in &variants {
        match r {
            Ok(()) => println!("  {n:<32} enabled"),
            Err(e) => println!("  {n:<32} off: {e}"),
        }
    }
    match Storage::for_dtype(&gpu, DType::F16) {
        Ok(st) => println!(
            "f16 tensors: {} (coop, where enabled, runs f16 attention forward and backward on \
             tensor cores)",
            st.name()
        ),
        Err(e) => println!("f16 tensors: off: {e}"),
    }
    Ok(ExitCode::SUCCESS)
}

fn bench_full_cmd(opts: &GpuOptions, a: &FullArgs) -> Result<ExitCode, Error> {
    let gpu = Gpu::new(opts)?;
    let masks: &[bool] = match a.mask {
        Mask::Causal => &[true],
        Mask::Full => &[false],
        Mask::Both => &[true, false],
    };
    let mut results: Vec<FullBench> = Vec::new();
    if !a.out.json {
        println!("device: {}", gpu.adapter());
        println!(
            "{:<25} {:>5} {:>5} {:>4} {:>6} {:>4} {:>6} | {:>9} {:>8} {:>7} | {:>9} {:>8} | {:>6}",
            "variant",
            "batch",
            "heads",
            "kv",
            "seq",
            "d",
            "causal",
            "fwd ms",
            "TFLOP/s",
            "GB/s",
            "bwd ms",
            "TFLOP/s",
            "vs base"
        );
    }
    for &d in &a.shape.head_dim {
        if !head_dim_supported(d) {
            return Err(Error::InvalidInput(format!(
                "head_dim {d} is not supported (multiples of 16 from 16 to 256)"
            )));
        }
        let mut variants: Vec<(Variants, Storage)> = Vec::new();
        for spec in &a.variant {
            let (storage, name) = match spec.split_once(':') {
                None => (Storage::F32, spec.as_str()),
                Some(("f32", n)) => (Storage::F32, n),
                Some(("f16", n)) => (Storage::for_dtype(&gpu, DType::F16)?, n),
                Some(("f16p", n)) => (Storage::F16Packed, n),
                Some((p, _)) => {
                    return Err(Error::InvalidInput(format!(
                        "unknown storage prefix `{p}` in `{spec}` (known: f32, f16, f16p)"
                    )));
                }
            };
            match name {
                "all" => variants.extend(
                    Variant::ALL
                        .iter()
                        .copied()
                        .filter(|v| variant_supported(&gpu, *v, d).is_ok())
                        .map(|v| (Variants::uniform(v), storage)),
                ),
                "auto" => {
                    let att = FullAttention::for_dtype(
                        &gpu,
                        a.shape.shape(a.shape.seq[0], d),
                        AttnOptions::default(),
                        storage.dtype(),
                    )?;
                    variants.push((att.variants(), att.storage()));
                }
                // Forward on tensor cores, backward on the largest f32-arithmetic tile.
                "coop-fwd" => variants.push((
                    Variants {
                        forward: Variant::Coop,
                        backward: auto_variants(&gpu, d)?.backward,
                    },
                    storage,
                )),
                other => variants.push((Variants::uniform(Variant::parse(other)?), storage)),
            }
        }
        variants.dedup();
        for &seq in &a.shape.seq {
            for &causal in masks {
                let shape = a.shape.shape(seq, d);
                let mut base: Option<f64> = None;
                for &(v, storage) in &variants {
                    let r = bench_full(
                        &gpu,
                        shape,
                        AttnOptions::causal(causal),
                        v,
                        storage,
                        !a.no_backward,
                        a.target_seconds,
                    )?;
                    let b = *base.get_or_insert(r.fwd_s);
                    if !a.out.json {
                        let s = &r.shape;
                        println!(
                            "{:<25} {:>5} {:>5} {:>4} {:>6} {:>4} {:>6} | {:>9.3} {:>8.2} {:>7.1} | {:>9} {:>8} | {:>5.2}x",
                            format!("{} {}", storage.name(), v.name()),
                            s.batch,
                            s.heads_q,
                            s.heads_kv,
                            s.seq_q,
                            s.head_dim,
                            causal,
                            r.fwd_s * 1e3,
                            r.fwd_tflops,
                            r.fwd_gbps,
                            r.bwd_s.map_or("-".into(), |x| format!("{:.3}", x * 1e3)),
                            r.bwd_tflops.map_or("-".into(), |x| format!("{x:.2}")),
                            b / r.fwd_s
                        );
                    }
                    results.push(r);
                }
            }
        }
    }
    let record = serde_json::json!({
        "baseline": "first variant listed for each shape (fwd time ratio)",
        "backward_flops": "2.5 x forward (FlashAttention convention)",
        "results": results.iter().map(|r| r.to_json()).collect::<Vec<_>>(),
    });
    emit_record(&gpu, record, &a.out)?;
    if !a.out.json {
        println!(
            "TFLOP/s count visible (query, key) pairs only (causal ~ half); backward FLOPs = 2.5 x \
             forward; GB/s = compulsory traffic (q, k, v, O, LSE); 'vs base' = forward speed over \
             the first variant of the row group."
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Where a benchmark's record goes.
#[derive(Args)]
struct Output {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Also append the JSON object (one line) to this file, keeping the table on stdout.
    #[arg(long)]
    json_out: Option<std::path::PathBuf>,
}

/// Complete a benchmark record (device, date, command) and print and/or append it.
fn emit_record(gpu: &Gpu, mut record: serde_json::Value, out: &Output) -> Result<(), Error> {
    record["device"] = gpu.adapter().to_string().into();
    record["date_utc"] = utc_date().into();
    record["command"] = std::env::args().collect::<Vec<_>>().join(" ").into();
    let line = serde_json::to_string(&record).expect("json");
    if let Some(path) = &out.json_out {
        use std::io::Write;
        let fail = |e: std::io::Error| {
            Error::InvalidInput(format!("cannot write {}: {e}", path.display()))
        };
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(fail)?;
        writeln!(f, "{line}").map_err(fail)?;
    }
    if out.json {
        println!("{line}");
    }
    Ok(())
}

/// Milliseconds of an optional time, or "-".
fn ms(t: Option<f64>) -> String {
    t.map_or("-".into(), |x| format!("{:.3}", x * 1e3))
}

fn bench_sparse_cmd(opts: &GpuOptions, a: &SparseArgs) -> Result<ExitCode, Error> {
    let gpu = Gpu::new(opts)?;
    if !a.out.json {
        println!("device: {}", gpu.adapter());
        println!(
            "{:>5} {:>5} {:>4} {:>6} {:>4} {:>4} {:>3} | {:>9} {:>9} {:>9} | {:>7} {:>7} | {:>8} {:>8} | {:>9} {:>9} {:>7}",
            "batch",
            "heads",
            "kv",
            "seq",
            "d",
            "B",
            "k",
            "select ms",
            "sparse ms",
            "dense ms",
            "speedup",
            "sel %",
            "eq TF/s",
            "TF/s",
            "sp bwd ms",
            "dn bwd ms",
            "bwd x"
        );
    }
    let mut results = Vec::new();
    for &d in &a.shape.head_dim {
        for &seq in &a.shape.seq {
            let shape = a.shape.shape(seq, d);
            let sel = a.select.options();
            let r = bench_sparse(
                &gpu,
                shape,
                sel,
                !a.no_backward,
                Reps::Target(a.target_seconds),
                a.stages,
                parse_dtype(&a.dtype)?,
                parse_kernel(&a.forward)?,
                parse_kernel(&a.backward)?,
                TopK::parse(&a.topk_kernel)?,
            )?;
            if !a.out.json {
                let s = &r.shape;
                println!(
                    "{:>5} {:>5} {:>4} {:>6} {:>4} {:>4} {:>3} | {:>9.3} {:>9.3} {:>9.3} | {:>6.2}x {:>6.1}% | {:>8.2} {:>8.2} | {:>9} {:>9} {:>7}",
                    s.batch,
                    s.heads_q,
                    s.heads_kv,
                    s.seq_q,
                    s.head_dim,
                    a.select.block,
                    a.select.topk,
                    r.select_s * 1e3,
                    r.sparse_fwd_s * 1e3,
                    r.dense_fwd_s * 1e3,
                    r.speedup(),
                    100.0 * r.select_s / (r.select_s + r.sparse_fwd_s),
                    r.dense_equiv_tflops,
                    r.sparse_tflops,
                    ms(r.sparse_bwd_s),
                    ms(r.dense_bwd_s),
                    r.dense_bwd_s
                        .zip(r.sparse_bwd_s)
                        .map_or("-".into(), |(d, s)| format!("{:.2}x", d / s))
                );
                for (kernel, secs, n) in &r.stages {
                    println!(
                        "      {kernel:<32} {:>9.3} ms  ({n} dispatches)",
                        secs * 1e3
                    );
                }
            }
            results.push(r);
        }
    }
    let record = serde_json::json!({
        "results": results.iter().map(|r| r.to_json()).collect::<Vec<_>>(),
    });
    emit_record(&gpu, record, &a.out)?;
    if !a.out.json {
        let mut kernels: Vec<&str> = results.iter().map(|r| r.forward).collect();
        kernels.dedup();
        println!("sparse forward kernel: {}", kernels.join(", "));
        let mut kernels: Vec<&str> = results.iter().map(|r| r.backward).collect();
        kernels.dedup();
        if !a.no_backward {
            println!("sparse backward kernels: {}", kernels.join(", "));
        }
        let mut topk: Vec<&str> = results.iter().map(|r| r.topk).collect();
        topk.dedup();
        println!("selection top-k kernel: {}", topk.join(", "));
        println!(
            "causal. speedup = dense causal forward / (selection + sparse forward); sel % = \
             selection's share of that time; eq TF/s = dense causal FLOPs per second of that time; \
             TF/s = FLOPs of the pairs the sparse forward attends to, per second of its own time; \
             bwd x = dense backward / sparse backward (the selection is reused from the forward)."
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn selfcheck(opts: &GpuOptions, seed: u64, json: bool) -> Result<ExitCode, Error> {
    let gpu = Gpu::new(opts)?;
    let checks = pollster::block_on(sparse_attn::selfcheck::selfcheck(&gpu, seed))?;
    let ok = checks.iter().all(|c| c.ok);
    if json {
        println!("{}", sparse_attn::selfcheck::to_json(&checks));
    } else {
        println!("device: {}", gpu.adapter());
        for c in &checks {
            println!(
                "  {:<36} {:>10.2e}  {}",
                c.name,
                c.error,
                if c.ok { "ok" } else { "FAILED" }
            );
        }
        println!(
            "{} (relative L2 error against the f64 references, tolerance {:.0e})",
            if ok {
                "all kernels agree"
            } else {
                "SOME KERNELS DISAGREE"
            },
            sparse_attn::selfcheck::TOLERANCE
        );
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn explore(opts: &GpuOptions, config: &str, timing: bool, arrays: bool) -> Result<ExitCode, Error> {
    let cfg = sparse_attn::explore::ExploreConfig::from_json(config)?;
    let gpu = Gpu::new(opts)?;
    let r = pollster::block_on(sparse_attn::explore::explore(&gpu, &cfg, timing))?;
    let mut j = r.to_json();
    if !arrays && let Some(o) = j.as_object_mut() {
        for key in ["block_mass", "selection", "sparsity"] {
            o.remove(key);
        }
    }
    println!("{j}");
    Ok(ExitCode::SUCCESS)
}

/// Today's date (UTC) as YYYY-MM-DD, for benchmark records.
fn utc_date() -> String {
    let days = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() / 86400)
        .unwrap_or(0) as i64;
    // Civil-from-days (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Relative L2 error the demo accepts for f32 kernels (observed ~1e-7..1e-6).
const DEMO_TOL: f64 = 1e-4;

fn demo(opts: &GpuOptions, a: &DemoArgs) -> Result<ExitCode, Error> {
    let shape = AttnShape::new(1, a.heads, a.kv_heads, a.seq, a.head_dim);
    let att_opts = AttnOptions::causal(true);
    shape.validate(&att_opts)?;
    let gpu = match Gpu::new(opts) {
        Ok(g) => g,
        Err(e @ Error::NoAdapter { .. }) => {
            println!("{e}");
            return demo_cpu_only(a.seed);
        }
        Err(e) => return Err(e),
    };
    println!("device: {}", gpu.adapter());
    println!(
        "problem: causal attention, batch 1, {} query heads / {} kv heads, seq {}, head_dim {} (seed {})",
        a.heads, a.kv_heads, a.seq, a.head_dim, a.seed
    );
    let mut rng = Rng::new(a.seed);
    let q = rng.normal_vec(shape.q_len(), 1.0);
    let k = rng.normal_vec(shape.kv_len(), 1.0);
    let v = rng.normal_vec(shape.kv_len(), 1.0);
    let d_o = rng.normal_vec(shape.q_len(), 1.0);

    let att = FullAttention::new(&gpu, shape, att_opts)?;
    println!("kernel variants: {}", att.variants().name());
    let (tq, tk, tv) = (
        gpu.upload(&shape.q_dims(), &q)?,
        gpu.upload(&shape.kv_dims(), &k)?,
        gpu.upload(&shape.kv_dims(), &v)?,
    );
    let out = att.forward(&gpu, &tq, &tk, &tv)?;
    let tdo = gpu.upload(&shape.q_dims(), &d_o)?;
    let grads = att.backward(&gpu, &tq, &tk, &tv, &out, &tdo)?;

    let t0 = Instant::now();
    let want = reference::attention::forward(&shape, &att_opts, &q, &k, &v)?;
    let want_g = reference::attention::backward(&shape, &att_opts, &q, &k, &v, &d_o)?;
    let cpu_s = t0.elapsed().as_secs_f64();

    let checks = [
        ("O", compare(&gpu.read(&out.o)?, &want.o)),
        ("LSE", compare(&gpu.read(&out.lse)?, &want.lse)),
        ("dQ", compare(&gpu.read(&grads.dq)?, &want_g.dq)),
        ("dK", compare(&gpu.read(&grads.dk)?, &want_g.dk)),
        ("dV", compare(&gpu.read(&grads.dv)?, &want_g.dv)),
    ];
    println!("error against the f64 CPU reference (relative L2, tolerance {DEMO_TOL:.0e}):");
    let mut ok = true;
    for (name, e) in &checks {
        let pass = e.within(DEMO_TOL);
        ok &= pass;
        println!(
            "  {name:<4} {:.2e}  (max abs {:.2e}){}",
            e.rel_l2,
            e.max_abs,
            if pass { "" } else { "  <-- FAIL" }
        );
    }
    let r = bench_full(
        &gpu,
        shape,
        att_opts,
        att.variants(),
        att.storage(),
        true,
        0.2,
    )?;
    println!(
        "speed: forward {:.3} ms ({:.3} TFLOP/s), backward {:.3} ms ({:.3} TFLOP/s) [{:?}]",
        r.fwd_s * 1e3,
        r.fwd_tflops,
        r.bwd_s.unwrap_or(0.0) * 1e3,
        r.bwd_tflops.unwrap_or(0.0),
        r.timer
    );
    println!(
        "CPU f64 reference for the same forward + backward: {:.1} ms ({:.0}x the GPU time)",
        cpu_s * 1e3,
        cpu_s / (r.fwd_s + r.bwd_s.unwrap_or(0.0))
    );

    // The same input through block-sparse attention, as SSA's sparse stream sees it.
    let block = 16;
    let nb = a.seq.div_ceil(block);
    let select = SelectOptions {
        block,
        k: (nb / 4).max(1),
        ..SelectOptions::ssa()
    };
    println!(
        "block-sparse: SSA selection, blocks of {block}, keep {} of {nb} per token and kv head",
        select.k
    );
    let (sel, _) = BlockSelect::new(&gpu, shape, select)?.select(&gpu, &tq, &tk)?;
    let sel_host = gpu.read_u32(&sel)?;
    let sparse_opts = SparseOptions {
        block,
        causal: true,
        scale: None,
    };
    let sparse = SparseAttention::new(&gpu, shape, sparse_opts, select.k, false)?;
    let sp_out = sparse.forward(&gpu, &tq, &tk, &tv, &sel, None)?;
    let sp_grads = sparse.backward(&gpu, &tq, &tk, &tv, &sel, None, &sp_out, &tdo)?;
    let want =
        reference::sparse::forward(&shape, &sparse_opts, &q, &k, &v, &sel_host, select.k, None)?;
    let want_g = reference::sparse::backward(
        &shape,
        &sparse_opts,
        &q,
        &k,
        &v,
        &sel_host,
        select.k,
        None,
        &d_o,
    )?;
    println!("  sparse kernels against the f64 reference:");
    for (name, e) in [
        ("O", compare(&gpu.read(&sp_out.o)?, &want.o)),
        ("LSE", compare(&gpu.read(&sp_out.lse)?, &want.lse)),
        ("dQ", compare(&gpu.read(&sp_grads.dq)?, &want_g.dq)),
        ("dK", compare(&gpu.read(&sp_grads.dk)?, &want_g.dk)),
        ("dV", compare(&gpu.read(&sp_grads.dv)?, &want_g.dv)),
    ] {
        let pass = e.within(DEMO_TOL);
        ok &= pass;
        println!(
            "    {name:<4} {:.2e}{}",
            e.rel_l2,
            if pass { "" } else { "  <-- FAIL" }
        );
    }
    let metrics = AttentionMetrics::new(&gpu, shape, att_opts, block, select.k)?
        .compute(&gpu, &tq, &tk, &sel)?;
    let sp = gpu.read(&metrics.sparsity)?;
    let mean_sp = sp.iter().map(|&x| x as f64).sum::<f64>() / sp.len() as f64;
    let diff = compare(&gpu.read(&sp_out.o)?, &gpu.read(&out.o)?);
    println!(
        "  attention sparsity (share of the full attention mass inside the kept blocks): mean \
         {mean_sp:.3}; sparse output vs full output: relative L2 {:.3}",
        diff.rel_l2
    );
    println!(
        "  (random inputs spread attention evenly; trained models concentrate it, and SSA \
         trains them to)"
    );
    // One repetition: the demo must stay quick on software adapters too.
    let r = bench_sparse(
        &gpu,
        shape,
        select,
        true,
        Reps::Fixed(1),
        false,
        DType::F32,
        SparseKernel::Auto,
        SparseKernel::Auto,
        TopK::Auto,
    )?;
    println!(
        "  speed: selection {:.3} ms + sparse forward {:.3} ms vs dense forward {:.3} ms \
         ({:.2}x); sparse backward {:.3} ms vs dense {:.3} ms ({:.2}x)",
        r.select_s * 1e3,
        r.sparse_fwd_s * 1e3,
        r.dense_fwd_s * 1e3,
        r.speedup(),
        r.sparse_bwd_s.unwrap_or(0.0) * 1e3,
        r.dense_bwd_s.unwrap_or(0.0) * 1e3,
        r.dense_bwd_s.unwrap_or(0.0) / r.sparse_bwd_s.unwrap_or(1.0)
    );
    if ok {
        println!("demo: PASS");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("demo: FAIL (GPU result differs from the reference)");
        Ok(ExitCode::FAILURE)
    }
}

/// Reshape a loaded array to [batch, heads, seq, head_dim].
fn as_4d(a: sparse_attn::npy::NpyArray, what: &str) -> Result<(Vec<usize>, Vec<f32>), Error> {
    let dims = match a.shape.len() {
        4 => a.shape.clone(),
        3 => vec![1, a.shape[0], a.shape[1], a.shape[2]],
        2 => vec![1, 1, a.shape[0], a.shape[1]],
        _ => {
            return Err(Error::InvalidInput(format!(
                "{what} has shape {:?}; expected [batch, heads, seq, head_dim] (or fewer leading \
                 dims)",
                a.shape
            )));
        }
    };
    Ok((dims, a.data))
}

fn map(opts: &GpuOptions, a: &MapArgs) -> Result<ExitCode, Error> {
    let (shape, q, k) = match (&a.q, &a.k) {
        (Some(qp), Some(kp)) => {
            let (qd, q) = as_4d(sparse_attn::safetensors::load_spec(qp)?, "q")?;
            let (kd, k) = as_4d(sparse_attn::safetensors::load_spec(kp)?, "k")?;
            if qd[0] != kd[0] || qd[3] != kd[3] {
                return Err(Error::InvalidInput(format!(
                    "q {qd:?} and k {kd:?} disagree on batch or head_dim"
                )));
            }
            let shape = AttnShape {
                batch: qd[0],
                heads_q: qd[1],
                heads_kv: kd[1],
                seq_q: qd[2],
                seq_k: kd[2],
                head_dim: qd[3],
            };
            (shape, q, k)
        }
        _ => {
            let shape = AttnShape::new(1, a.heads, a.kv_heads, a.seq, a.head_dim);
            shape.validate(&AttnOptions::causal(true))?;
            let (q, k) = sparse_attn::viz::structured_qk(&shape, a.seed);
            (shape, q, k)
        }
    };
    let att_opts = AttnOptions::causal(true);
    shape.validate(&att_opts)?;
    if a.head >= shape.heads_q || a.batch_index >= shape.batch {
        return Err(Error::InvalidInput(format!(
            "head {} / batch index {} out of range for {shape:?}",
            a.head, a.batch_index
        )));
    }
    let select = a.select.options();
    let gpu = Gpu::new(opts)?;
    let (tq, tk) = (
        gpu.upload(&shape.q_dims(), &q)?,
        gpu.upload(&shape.kv_dims(), &k)?,
    );
    let (sel, _) = BlockSelect::new(&gpu, shape, select)?.select(&gpu, &tq, &tk)?;
    let metrics = AttentionMetrics::new(&gpu, shape, att_opts, select.block, select.k)?
        .compute(&gpu, &tq, &tk, &sel)?;
    let (sq, nb) = (shape.seq_q, shape.seq_k.div_ceil(select.block));
    let bh = a.batch_index * shape.heads_q + a.head;
    let bkv = bh / shape.group();
    let mass = gpu.read(&metrics.block_mass)?[bh * sq * nb..(bh + 1) * sq * nb].to_vec();
    let sparsity = gpu.read(&metrics.sparsity)?[bh * sq..(bh + 1) * sq].to_vec();
    let selection = gpu.read_u32(&sel)?[bkv * sq * select.k..(bkv + 1) * sq * select.k].to_vec();
    let probs = (shape.seq_k <= a.token_level_max)
        .then(|| reference::attention::probabilities(&shape, &att_opts, &q, &k, bh))
        .transpose()?;
    let mean = sparsity.iter().map(|&x| x as f64).sum::<f64>() / sq as f64;
    let source = match &a.q {
        Some(p) => p.clone(),
        None => format!("structured random inputs (seed {})", a.seed),
    };
    let data = sparse_attn::viz::MapData {
        title: vec![
            format!(
                "full attention, batch {} head {} of {source}",
                a.batch_index, a.head
            ),
            format!(
                "{:?} selection: B={} k={} (init {}, local {}); mean kept mass {mean:.3}",
                select.scoring, select.block, select.k, select.n_init, select.n_local
            ),
        ],
        seq_q: sq,
        seq_k: shape.seq_k,
        q_offset: shape.q_offset(),
        block: select.block,
        causal: true,
        probs: probs.as_deref(),
        block_mass: &mass,
        selection: &selection,
        k: select.k,
        sparsity: &sparsity,
    };
    let img = sparse_attn::viz::render_map(&data)?;
    img.save(&a.out)
        .map_err(|e| Error::InvalidInput(format!("cannot write {}: {e}", a.out.display())))?;
    println!(
        "wrote {} ({}x{} px, {} map) on {}; mean kept attention mass {mean:.3}",
        a.out.display(),
        img.width(),
        img.height(),
        if probs.is_some() {
            "token-level"
        } else {
            "block-level"
        },
        gpu.adapter()
    );
    Ok(ExitCode::SUCCESS)
}

/// No GPU: still show the computation, on the CPU reference at a small size.
fn demo_cpu_only(seed: u64) -> Result<ExitCode, Error> {
    let shape = AttnShape::new(1, 2, 1, 128, 64);
    let opts = AttnOptions::causal(true);
    println!(
        "running the CPU reference instead: causal attention, 2 query heads / 1 kv head, seq 128, \
         head_dim 64 (seed {seed})"
    );
    let mut rng = Rng::new(seed);
    let q = rng.normal_vec(shape.q_len(), 1.0);
    let k = rng.normal_vec(shape.kv_len(), 1.0);
    let v = rng.normal_vec(shape.kv_len(), 1.0);
    let t0 = Instant::now();
    let f = reference::attention::forward(&shape, &opts, &q, &k, &v)?;
    let dt = t0.elapsed().as_secs_f64();
    let mean_lse = f.lse.iter().map(|&x| x as f64).sum::<f64>() / f.lse.len() as f64;
    println!(
        "CPU reference forward: {:.1} ms, mean LSE {mean_lse:.4}, O[0][0..4] = {:?}",
        dt * 1e3,
        &f.o[..4]
    );
    println!("demo: CPU-only (no GPU adapter); install a Vulkan driver to run the GPU kernels");
    Ok(ExitCode::SUCCESS)
}

#[cfg(feature = "train")]
fn train_cmd(opts: &GpuOptions, a: &TrainArgs) -> Result<ExitCode, Error> {
    use sparse_attn::train::{Runtime, data::Corpus, train};
    let cfg = a.run.config(&a.mode)?;
    let corpus = Corpus::load(&a.data, a.valid_every)?;
    let rt = Runtime::new(opts)?;
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
    let inv = sparse_attn::train::trainer::Invocation {
        resume: a.resume,
        quiet: false,
        stop_after: a.stop_after,
        time_limit_s: a.time_limit,
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
fn eval_cmd(opts: &GpuOptions, a: &EvalArgs) -> Result<ExitCode, Error> {
    use sparse_attn::train::eval::{EvalConfig, evaluate, plot_reports, table};
    use sparse_attn::train::{Runtime, data::Corpus, trainer::load};
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
        let all = serde_json::json!({"devices": devices, "reports": reports});
        std::fs::write(&a.out, serde_json::to_string_pretty(&all).unwrap())
            .map_err(|e| Error::InvalidInput(format!("writing {}: {e}", a.out.display())))?;
        let files = plot_reports(&reports, &a.plots)?;
        println!("{}", table(&reports));
        for f in files {
            eprintln!("plot: {}", f.display());
        }
        return Ok(ExitCode::SUCCESS);
    }
    let corpus = Corpus::load(&a.data, a.valid_every)?;
    let rt = Runtime::new(opts)?;
    let ec = EvalConfig {
        windows: a.windows,
        batch: a.batch,
        budgets: a.budgets.clone(),
        lengths: a.lengths.clone(),
        passkeys: a.passkeys,
        metric_windows: a.metric_windows,
        ..EvalConfig::default()
    };
    let mut reports = Vec::new();
    for dir in &a.ckpt {
        let (model, cfg) = load(dir, &rt.device)?;
        eprintln!("== {} ({})", dir.display(), cfg.mode.name());
        let mut r = evaluate(&model, &cfg, &corpus, &rt.gpu, &rt.device, &ec, true)?;
        r["checkpoint"] = serde_json::json!(dir.display().to_string());
        // The training log (loss, validation loss, tokens/s by step) travels with the report.
        let state = std::fs::read_to_string(dir.join("state.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
        if let Some(st) = state {
            r["train_log"] = st["log"].clone();
            r["train_config"] = st["config"].clone();
        }
        reports.push(r);
    }
    let all = serde_json::json!({"device": rt.gpu.adapter().to_string(), "reports": reports});
    std::fs::write(&a.out, serde_json::to_string_pretty(&all).unwrap())
        .map_err(|e| Error::InvalidInput(format!("writing {}: {e}", a.out.display())))?;
    let files = plot_reports(&reports, &a.plots)?;
    println!("{}", table(&reports));
    eprintln!("report: {}", a.out.display());
    for f in files {
        eprintln!("plot: {}", f.display());
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(feature = "train")]
fn bench_train_cmd(opts: &GpuOptions, a: &BenchTrainArgs) -> Result<ExitCode, Error> {
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
            "{:>6}: {:.1} ms/step, {:.0} tokens/s, our kernels {:.1} ms/step",
            m,
            t.step_s * 1e3,
            t.tokens_per_s,
            t.ours_s() * 1e3
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
    println!("| mode | ms/step | tokens/s | our kernels ms/step | share of step |");
    println!("|---|---|---|---|---|");
    for (_, t) in &rows {
        println!(
            "| {} | {:.1} | {:.0} | {:.1} | {:.0}% |",
            t.mode.name(),
            t.step_s * 1e3,
            t.tokens_per_s,
            t.ours_s() * 1e3,
            100.0 * t.ours_s() / t.step_s
        );
    }
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
    }
    if a.json {
        let j: Vec<_> = rows
            .iter()
            .map(|(c, t)| {
                serde_json::json!({"mode": t.mode.name(), "config": c.to_json(),
                    "step_s": t.step_s, "tokens_per_s": t.tokens_per_s,
                    "ours_s": t.ours_s(),
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
