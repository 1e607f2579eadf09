//! `sparse-attn`: device info, benchmarks, attention maps, a self-checking demo, and (with
//! `--features train`) training and evaluation. One file per command; `report` prints every
//! table and JSON record.

mod args;
mod bench;
mod bench_cmd;
mod bench_decode;
mod bench_generate;
mod demo;
mod generate;
mod gguf_cmd;
mod info;
mod map;
mod perplexity;
mod report;
mod selfcheck;
mod train;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sparse_attn::GpuOptions;

use crate::bench_cmd::{FullArgs, SparseArgs};
use crate::demo::DemoArgs;
use crate::map::MapArgs;
use crate::train::{BenchTrainArgs, EvalArgs, TrainArgs};

#[derive(Parser)]
#[command(
    name = "sparse-attn",
    version,
    about = "Trainable sparse attention on any GPU (WebGPU)"
)]
struct Cli {
    /// Adapter to use: a backend (vulkan, metal, dx12, gl), a device type (discrete, integrated,
    /// cpu) or part of its name; several terms joined by commas; `#N` takes the N-th (from 0)
    /// of those matching (e.g. `vulkan,#1`: the second GPU). Default: SPARSE_ATTN_ADAPTER,
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
    /// Check every kernel family against the f64 reference on the best device (the selfcheck),
    /// then time full and block-sparse attention at the shape given.
    Demo(DemoArgs),
    /// Draw where full attention goes, which blocks the selector keeps, and each token's kept
    /// share of the attention mass, as a PNG.
    Map(MapArgs),
    /// What the browser demo computes (web/), natively: full and sparse attention, selection and
    /// metrics for one configuration, as JSON. Same numbers as the page for the same config.
    /// With --gguf: the page's model mode (the model's own q, k, v of one layer for --text,
    /// and its next-token previews with full and with block-sparse attention).
    Explore {
        /// JSON object; missing fields keep their defaults, e.g.
        /// '{"seq":512,"heads":4,"kv_heads":1,"head_dim":64,"block":16,"topk":8,"n_init":1,
        /// "n_local":1,"scoring":"ssa","seed":42,"head":0,"inputs":"structured"}';
        /// with --gguf: '{"layer":0,"head":0,"block":16,"topk":4,"n_init":1,"n_local":1,
        /// "scoring":"infllm-v2"}'
        #[arg(long, default_value = "{}")]
        config: String,
        /// A Llama-family GGUF model (the page's model mode).
        #[arg(long, requires = "text")]
        gguf: Option<std::path::PathBuf>,
        /// The text the model reads (with --gguf).
        #[arg(long, requires = "gguf")]
        text: Option<String>,
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
    /// kernels (Burn on the wgpu backend); checkpoints to --out, --resume continues one. Needs a
    /// build with `--features train`.
    Train(TrainArgs),
    /// Evaluate trained checkpoints, full and sparse inference: perplexity, per-layer attention
    /// sparsity and entropy, a budget sweep, length extrapolation with pass-key retrieval. Prints
    /// a table; writes the JSON report and PNG plots.
    Eval(EvalArgs),
    /// Generate text from a trained checkpoint with a KV cache (full, sparse or NOSA
    /// attention; --offload keeps the cache in host memory, NOSA's way), streamed as it comes;
    /// ends with tokens/s, hit rate and KV memory. Needs a build with `--features train`.
    Generate(generate::GenerateArgs),
    /// A pretrained GGUF model's validation perplexity with training-free sparse attention:
    /// full against SSA, MoBA, InfLLM-V2 and NOSA's selection over budgets and context lengths,
    /// with each selection's decoding hit rate. Needs a build with `--features train`.
    Perplexity(perplexity::PerplexityArgs),
    /// What a GGUF model file holds: architecture, hyperparameters, tensor types, tokenizer
    /// (no GPU needed).
    Gguf(gguf_cmd::GgufArgs),
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Training throughput per mode (tokens/s), SSA's step cost over sparse-only and full, and
    /// the share of the step's GPU time spent in our attention kernels.
    Train(BenchTrainArgs),
    /// Tiled full attention, forward and backward.
    Full(FullArgs),
    /// Block selection + block-sparse forward and backward against the dense causal kernels.
    Sparse(SparseArgs),
    /// Decoding throughput of a synthetic model's attention: full and InfLLM-V2 with the KV
    /// cache on the GPU, InfLLM-V2 and NOSA with it offloaded to host memory.
    Decode(bench_decode::DecodeArgs),
    /// A pretrained GGUF model decoding a batch of held-out prompts: full and sparse attention
    /// with the cache on the GPU, sparse with it offloaded; prefill time, tokens/s, GPU and host
    /// KV memory, hit rate. Needs a build with `--features train`.
    Generate(bench_generate::BenchGenerateArgs),
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let opts = GpuOptions {
        adapter: cli.adapter.clone(),
        ..Default::default()
    };
    let result = match cli.cmd {
        Cmd::Info { json } => info::info(&opts, json),
        Cmd::Bench {
            which: BenchCmd::Full(a),
        } => bench_cmd::bench_full_cmd(&opts, &a),
        Cmd::Bench {
            which: BenchCmd::Sparse(a),
        } => bench_cmd::bench_sparse_cmd(&opts, &a),
        Cmd::Bench {
            which: BenchCmd::Train(a),
        } => train::bench_train_cmd(&opts, &a),
        Cmd::Bench {
            which: BenchCmd::Decode(a),
        } => bench_decode::bench_decode_cmd(&opts, &a),
        Cmd::Bench {
            which: BenchCmd::Generate(a),
        } => bench_generate::bench_generate_cmd(&opts, &a),
        Cmd::Demo(a) => demo::demo(&opts, &a),
        Cmd::Map(a) => map::map(&opts, &a),
        Cmd::Explore {
            config,
            gguf: Some(file),
            text: Some(text),
            timing,
            arrays,
        } => selfcheck::explore_model(&opts, &file, &text, &config, timing, arrays),
        Cmd::Explore {
            config,
            timing,
            arrays,
            ..
        } => selfcheck::explore(&opts, &config, timing, arrays),
        Cmd::Selfcheck { seed, json } => selfcheck::selfcheck(&opts, seed, json),
        Cmd::Train(a) => train::train_cmd(&opts, &a),
        Cmd::Eval(a) => train::eval_cmd(&opts, &a),
        Cmd::Generate(a) => generate::generate_cmd(&opts, &a),
        Cmd::Perplexity(a) => perplexity::perplexity_cmd(&opts, &a),
        Cmd::Gguf(a) => gguf_cmd::gguf_cmd(&a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
