//! `bench generate`: a pretrained GGUF model decoding a batch of held-out prompts, three ways:
//! full attention and block-sparse attention with the KV cache on the GPU, and block-sparse
//! attention with the cache offloaded to host memory (NOSA's engine; `--gpu-kv-mb` sets its GPU
//! budget). Reports the prompt's prefill time, decoding tokens/s, the cache's GPU and host
//! bytes and the offloaded cache's hit rate; with `--gpu-kv-mb`, whether each way's GPU cache
//! fits that budget. Greedy decoding; the host waits for each sampled token. Needs
//! `--features train`.

use std::process::ExitCode;

use sparse_attn::{Error, GpuOptions};

#[cfg(not(feature = "train"))]
pub use crate::train::TrainArgs as BenchGenerateArgs;

#[cfg(not(feature = "train"))]
pub fn bench_generate_cmd(_: &GpuOptions, _: &BenchGenerateArgs) -> Result<ExitCode, Error> {
    Err(Error::NotBuilt(
        "`bench generate` runs a pretrained model, which needs the training stack (Burn); \
         rebuild with it: `cargo run --release --features train -- bench generate ...`"
            .into(),
    ))
}

#[cfg(feature = "train")]
#[derive(clap::Args)]
pub struct BenchGenerateArgs {
    /// The model, and the held-out text whose windows are the prompts (sequence b starts b
    /// prompt lengths in).
    #[command(flatten)]
    pub model: crate::args::GgufText,
    /// Sequences decoded together.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1, 16])]
    pub batch: Vec<usize>,
    /// Prompt tokens per sequence.
    #[arg(long, value_delimiter = ',', default_values_t = vec![2048, 8192])]
    pub context: Vec<usize>,
    /// Ways to decode: full, sparse (cache on the GPU), offload (sparse, cache in host memory).
    #[arg(long, value_delimiter = ',', default_values_t = vec!["full".to_string(), "sparse".to_string(), "offload".to_string()])]
    pub modes: Vec<String>,
    /// Sparse: blocks of this many tokens, --budget blocks per query (InfLLM-V2 scoring, the
    /// first block and two local ones kept).
    #[arg(long, default_value_t = 64)]
    pub block: usize,
    #[arg(long, default_value_t = 16)]
    pub budget: usize,
    /// Offloaded: GPU memory for the whole batch's KV cache, in MB (slots, pooled selection
    /// state, lists; as many slots as fit; default: one slot per selected block, the least).
    #[arg(long)]
    pub gpu_kv_mb: Option<f64>,
    #[arg(long, default_value = "auto")]
    pub offload_path: String,
    /// Timed decoding steps, after 2 untimed ones.
    #[arg(long, default_value_t = 32)]
    pub steps: usize,
    #[command(flatten)]
    pub out: crate::report::Output,
}

#[cfg(feature = "train")]
pub fn bench_generate_cmd(opts: &GpuOptions, a: &BenchGenerateArgs) -> Result<ExitCode, Error> {
    use std::time::Instant;

    use sparse_attn::decode::OffloadPath;
    use sparse_attn::train::generate::{Attention, Decoder, GenerateOptions, Sampler};
    use sparse_attn::train::llama::SparseSettings;
    use sparse_attn::train::{Runtime, gpu_for};

    use crate::report::{Table, emit_record};

    const WARMUP: usize = 2;
    a.out.prepare()?;
    let modes: Vec<&str> = a.modes.iter().map(String::as_str).collect();
    if let Some(m) = modes
        .iter()
        .find(|m| !["full", "sparse", "offload"].contains(m))
    {
        return Err(Error::InvalidInput(format!(
            "unknown mode `{m}` (known: full, sparse, offload)"
        )));
    }
    if a.steps == 0 || a.batch.contains(&0) || a.context.contains(&0) {
        return Err(Error::InvalidInput(
            "--steps, every --batch and every --context must be at least 1".into(),
        ));
    }
    if let Some(mb) = a.gpu_kv_mb
        && !(mb.is_finite() && mb > 0.0)
    {
        return Err(Error::InvalidInput(format!(
            "--gpu-kv-mb {mb}: need a positive number"
        )));
    }
    let path = OffloadPath::parse(&a.offload_path)?;
    let corpus = a.model.corpus()?;
    let rt = Runtime::new(&Runtime::gpu_options(&GpuOptions {
        host_memory: modes.contains(&"offload") && path != OffloadPath::Staged,
        ..opts.clone()
    }))?;
    let sparse = SparseSettings {
        block: a.block,
        topk: a.budget,
        ..SparseSettings::default()
    };
    let (p, tokens) = a.model.load(&corpus, &rt.device, sparse)?;
    let m = &p.config;
    let mut table = Table::new(&[
        "mode",
        "batch",
        "context",
        "|",
        "prefill s",
        "tokens/s",
        "|",
        "GPU KV MB",
        "host KV MB",
        "hit rate",
        "fits --gpu-kv-mb",
    ]);
    let mut records = vec![];
    // Every point is checked before the first runs.
    for &batch in &a.batch {
        for &ctx in &a.context {
            if ctx + WARMUP + a.steps > m.max_seq {
                return Err(Error::InvalidInput(format!(
                    "a context of {ctx} plus {} steps exceeds the model's {} tokens",
                    WARMUP + a.steps,
                    m.max_seq
                )));
            }
            if batch * ctx > tokens.len() {
                return Err(Error::InvalidInput(format!(
                    "{batch} prompts of {ctx} tokens need {} held-out tokens; {} has {}",
                    batch * ctx,
                    a.model.data.display(),
                    tokens.len()
                )));
            }
        }
    }
    for &batch in &a.batch {
        for &ctx in &a.context {
            let capacity = ctx + WARMUP + a.steps;
            let prompt = &tokens[..batch * ctx];
            for &mode in &modes {
                let offload = mode == "offload";
                let attention = match mode {
                    "full" => Attention::Full,
                    _ => Attention::Sparse,
                };
                let gopts = GenerateOptions {
                    offload_slots: offload.then_some(m.topk),
                    gpu_kv_budget: a.gpu_kv_mb.filter(|_| offload).map(|mb| (mb * 1e6) as u64),
                    offload_path: path,
                    batch,
                    ..GenerateOptions::new(attention, capacity)
                };
                let mut dec = Decoder::new(&rt, p.model.clone(), m, &gopts)?;
                let mut sampler = Sampler::new(0.0, 1.0, 1)?;
                let t0 = Instant::now();
                let logits = dec.prefill(prompt, ctx)?;
                let mut next = sampler.sample(logits)?;
                let prefill_s = t0.elapsed().as_secs_f64();
                let mut t1 = Instant::now();
                for s in 0..WARMUP + a.steps {
                    if s == WARMUP {
                        t1 = Instant::now();
                    }
                    next = sampler.sample(dec.step(&next)?)?;
                }
                let secs = t1.elapsed().as_secs_f64();
                let tps = (batch * a.steps) as f64 / secs;
                let (gpu_kv, host_kv) = dec.kv_bytes();
                let hit = dec.offload_stats()?.map(|s| s.hit_rate());
                let fits = a.gpu_kv_mb.map(|mb| gpu_kv as f64 <= mb * 1e6);
                eprintln!(
                    "{mode} batch {batch} context {ctx}: prefill {prefill_s:.2} s, \
                     {tps:.1} tokens/s, GPU KV {:.1} MB, host KV {:.1} MB, hit rate {hit:?}",
                    gpu_kv as f64 / 1e6,
                    host_kv as f64 / 1e6
                );
                table.row(vec![
                    mode.into(),
                    batch.to_string(),
                    ctx.to_string(),
                    format!("{prefill_s:.2}"),
                    format!("{tps:.1}"),
                    format!("{:.1}", gpu_kv as f64 / 1e6),
                    format!("{:.1}", host_kv as f64 / 1e6),
                    hit.map_or("-".into(), |h| format!("{h:.3}")),
                    fits.map_or("-".into(), |f| if f { "yes" } else { "no" }.into()),
                ]);
                records.push(serde_json::json!({
                    "mode": mode, "batch": batch, "context": ctx, "prefill_s": prefill_s,
                    "tokens_per_s": tps, "gpu_kv_bytes": gpu_kv, "host_kv_bytes": host_kv,
                    "hit_rate": hit,
                    "offload_path": dec.offload_path().map(OffloadPath::name),
                }));
            }
        }
    }
    let gpu = gpu_for(&rt.device)?;
    let record = serde_json::json!({
        "bench": "generate", "model": a.model.model_name(),
        "block": a.block, "budget": a.budget, "steps": a.steps, "gpu_kv_mb": a.gpu_kv_mb,
        "runs": records,
    });
    if !a.out.json {
        table.print();
        println!(
            "{}: greedy decoding of held-out prompts ({}), the host waiting for each token; \
             sparse: blocks of {}, {} per query (InfLLM-V2 scoring); offload: the same \
             selection, the cache in host memory.",
            a.model.gguf.display(),
            a.model.data.display(),
            a.block,
            a.budget
        );
    }
    emit_record(&gpu, record, &a.out)?;
    Ok(ExitCode::SUCCESS)
}
