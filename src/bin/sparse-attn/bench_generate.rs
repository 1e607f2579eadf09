//! `bench generate`: a model decoding a batch of held-out prompts, the four ways of NOSA's
//! comparison: (a) `full` and (b) `sparse` (the model's selection by the query: InfLLM-V2's for
//! GGUF models and checkpoints trained with it) with the KV cache on the GPU, (c) `offload` (the same selection, the cache in host memory: NOSA's engine) and
//! (d) `offload-nosa` (NOSA's selection, query-aware blocks plus the eviction head's, offloaded);
//! `nosa` is NOSA's selection with the cache on the GPU. The model is a pretrained GGUF file
//! (`--gguf`) or one or more trained checkpoints (`--ckpt`, at contexts up to their `max_seq`:
//! past the training length, the "trained small model extrapolated"). Reports the prompt's
//! prefill time, decoding tokens/s, the cache's GPU and host bytes, and for the offloaded
//! caches the bytes copied per step and the hit rate (both over the timed steps); with
//! `--gpu-kv-mb`, whether each way's GPU cache fits that budget. Greedy decoding; the host
//! waits for each sampled token. Needs `--features train`.

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
    /// A Llama-family model in a GGUF file (scripts/fetch-model.sh fetches SmolLM2-135M).
    #[arg(long, required_unless_present = "ckpt", conflicts_with = "ckpt")]
    pub gguf: Option<std::path::PathBuf>,
    /// Trained checkpoint folders (from `train --out`), each measured in turn; their tokens
    /// are bytes.
    #[arg(long, num_args = 1..)]
    pub ckpt: Vec<std::path::PathBuf>,
    /// Folder of .txt files; every --valid-every-th file (sorted, from the first) is held out
    /// (the same split as `train` and `eval`) and gives the prompts (sequence b starts b
    /// prompt lengths in).
    #[arg(long, default_value = "data/shakespeare")]
    pub data: std::path::PathBuf,
    #[arg(long, default_value_t = 10)]
    pub valid_every: usize,
    /// Sequences decoded together.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1, 16])]
    pub batch: Vec<usize>,
    /// Prompt tokens per sequence.
    #[arg(long, value_delimiter = ',', default_values_t = vec![2048, 8192])]
    pub context: Vec<usize>,
    /// Ways to decode: full, sparse (cache on the GPU), offload (sparse, cache in host
    /// memory), nosa and offload-nosa (NOSA's selection: models trained with its eviction head).
    #[arg(long, value_delimiter = ',', default_values_t = vec!["full".to_string(), "sparse".to_string(), "offload".to_string()])]
    pub modes: Vec<String>,
    /// With --gguf: blocks of this many tokens (InfLLM-V2 scoring, the first block and two
    /// local ones kept; default 64). A checkpoint selects as it was trained.
    #[arg(long)]
    pub block: Option<usize>,
    /// Blocks per query (default: 16 for --gguf, a checkpoint's trained budget).
    #[arg(long)]
    pub budget: Option<usize>,
    /// Offloaded: GPU memory for the whole batch's KV cache, in MB (slots, pooled selection
    /// state, lists; as many slots as fit; default: one slot per selected block, the least).
    #[arg(long)]
    pub gpu_kv_mb: Option<f64>,
    #[arg(long, default_value = "auto", value_parser = crate::report::offload_path)]
    pub offload_path: sparse_attn::decode::OffloadPath,
    /// Timed decoding steps, after 2 untimed ones.
    #[arg(long, default_value_t = 32)]
    pub steps: usize,
    #[command(flatten)]
    pub out: crate::report::Output,
}

/// One way to decode (`--modes`).
#[cfg(feature = "train")]
#[derive(Clone, Copy, PartialEq)]
struct Way {
    name: &'static str,
    nosa: bool,
    offload: bool,
}

#[cfg(feature = "train")]
const WAYS: [Way; 5] = [
    Way {
        name: "full",
        nosa: false,
        offload: false,
    },
    Way {
        name: "sparse",
        nosa: false,
        offload: false,
    },
    Way {
        name: "offload",
        nosa: false,
        offload: true,
    },
    Way {
        name: "nosa",
        nosa: true,
        offload: false,
    },
    Way {
        name: "offload-nosa",
        nosa: true,
        offload: true,
    },
];

/// A model to measure, with the held-out text in its tokens.
#[cfg(feature = "train")]
struct Subject {
    name: String,
    model: sparse_attn::train::model::Lm,
    config: sparse_attn::train::model::LmConfig,
    tokens: std::sync::Arc<Vec<u32>>,
}

#[cfg(feature = "train")]
pub fn bench_generate_cmd(opts: &GpuOptions, a: &BenchGenerateArgs) -> Result<ExitCode, Error> {
    use std::sync::Arc;
    use std::time::Instant;

    use sparse_attn::decode::{OffloadConfig, OffloadPath};
    use sparse_attn::gpu::DType;
    use sparse_attn::train::generate::{Attention, Decoder, GenerateOptions, Sampler};
    use sparse_attn::train::llama::SparseSettings;
    use sparse_attn::train::{Runtime, gpu_for};

    use crate::report::{Table, emit_record};

    const WARMUP: usize = 2;
    a.out.prepare()?;
    let ways: Vec<Way> = a
        .modes
        .iter()
        .map(|m| {
            WAYS.iter().copied().find(|w| w.name == m).ok_or_else(|| {
                Error::InvalidInput(format!(
                    "unknown mode `{m}` (known: full, sparse, offload, nosa, offload-nosa)"
                ))
            })
        })
        .collect::<Result<_, _>>()?;
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
    if a.gguf.is_none() && a.block.is_some() {
        return Err(Error::InvalidInput(
            "--block is for --gguf models: a checkpoint selects blocks as it was trained".into(),
        ));
    }
    let path = a.offload_path;
    let corpus = sparse_attn::train::data::Corpus::load(&a.data, a.valid_every)?;
    let rt = Runtime::new(&Runtime::gpu_options(&GpuOptions {
        host_memory: ways.iter().any(|w| w.offload) && path != OffloadPath::Staged,
        ..opts.clone()
    }))?;
    let mut subjects = vec![];
    if let Some(gguf) = &a.gguf {
        let sparse = SparseSettings {
            block: a.block.unwrap_or(64),
            topk: a.budget.unwrap_or(16),
            ..SparseSettings::default()
        };
        let text = crate::args::GgufText {
            gguf: gguf.clone(),
            data: a.data.clone(),
            valid_every: a.valid_every,
        };
        let (p, tokens) = text.load(&corpus, &rt.device, sparse)?;
        subjects.push(Subject {
            name: text.model_name().unwrap_or_default(),
            model: p.model,
            config: p.config,
            tokens: Arc::new(tokens),
        });
    }
    let bytes: Arc<Vec<u32>> = Arc::new(corpus.valid.iter().map(|&b| u32::from(b)).collect());
    for dir in &a.ckpt {
        let (model, cfg) = sparse_attn::train::trainer::load(dir, &rt.device)?;
        let config = match a.budget {
            Some(k) => cfg.model.with_topk(k),
            None => cfg.model,
        };
        subjects.push(Subject {
            name: dir.display().to_string(),
            model,
            config,
            tokens: bytes.clone(),
        });
    }
    if ways.iter().any(|w| w.nosa) && !subjects.iter().any(|s| s.config.has_evict_head()) {
        return Err(Error::InvalidInput(
            "the nosa modes need a model trained with NOSA's eviction head (train --mode nosa)"
                .into(),
        ));
    }
    let mut table = Table::new(&[
        "model",
        "mode",
        "batch",
        "context",
        "|",
        "prefill s",
        "tokens/s",
        "|",
        "GPU KV MB",
        "host KV MB",
        "copied MB/step",
        "hit rate",
        "fits --gpu-kv-mb",
    ]);
    let mut records = vec![];
    // Every point is checked before the first runs.
    for s in &subjects {
        let m = &s.config;
        m.validate()?;
        for &batch in &a.batch {
            for &ctx in &a.context {
                if ctx + WARMUP + a.steps > m.max_seq {
                    return Err(Error::InvalidInput(format!(
                        "{}: a context of {ctx} plus {} steps exceeds the model's {} tokens",
                        s.name,
                        WARMUP + a.steps,
                        m.max_seq
                    )));
                }
                if batch * ctx > s.tokens.len() {
                    return Err(Error::InvalidInput(format!(
                        "{batch} prompts of {ctx} tokens need {} held-out tokens; {} has {}",
                        batch * ctx,
                        a.data.display(),
                        s.tokens.len()
                    )));
                }
            }
        }
    }
    for s in &subjects {
        let m = &s.config;
        for &batch in &a.batch {
            for &ctx in &a.context {
                let capacity = ctx + WARMUP + a.steps;
                let prompt = &s.tokens[..batch * ctx];
                for &way in &ways {
                    if way.nosa && !m.has_evict_head() {
                        eprintln!(
                            "{} {}: skipped: no eviction head (not trained with NOSA)",
                            s.name, way.name
                        );
                        continue;
                    }
                    let attention = match way.name {
                        "full" => Attention::Full,
                        _ if way.nosa => Attention::Nosa,
                        _ => Attention::Sparse,
                    };
                    let gopts = GenerateOptions {
                        offload_slots: way.offload.then_some(m.topk),
                        gpu_kv_budget: a
                            .gpu_kv_mb
                            .filter(|_| way.offload)
                            .map(|mb| (mb * 1e6) as u64),
                        offload_path: path,
                        batch,
                        ..GenerateOptions::new(attention, capacity)
                    };
                    let mut dec = Decoder::new(&rt, s.model.clone(), m, &gopts)?;
                    let mut sampler = Sampler::new(0.0, 1.0, 1)?;
                    let t0 = Instant::now();
                    let logits = dec.prefill(prompt, ctx)?;
                    let mut next = sampler.sample(logits)?;
                    let prefill_s = t0.elapsed().as_secs_f64();
                    let mut t1 = Instant::now();
                    for step in 0..WARMUP + a.steps {
                        if step == WARMUP {
                            // Hit rate and copies over the timed steps only: the first step
                            // after an offloaded prefill finds no block on the GPU.
                            dec.reset_offload_stats()?;
                            t1 = Instant::now();
                        }
                        next = sampler.sample(dec.step(&next)?)?;
                    }
                    let secs = t1.elapsed().as_secs_f64();
                    let tps = (batch * a.steps) as f64 / secs;
                    let (gpu_kv, host_kv) = dec.kv_bytes();
                    let stats = dec.offload_stats()?;
                    let hit = stats.map(|s| s.hit_rate());
                    let block_bytes = OffloadConfig::slot_bytes(
                        DType::F32,
                        m.block,
                        m.head_dim(),
                        m.has_evict_head(),
                    );
                    let copied =
                        stats.map(|s| s.copied_bytes(block_bytes, m.block) as f64 / a.steps as f64);
                    let fits = a.gpu_kv_mb.map(|mb| gpu_kv as f64 <= mb * 1e6);
                    eprintln!(
                        "{} {} batch {batch} context {ctx}: prefill {prefill_s:.2} s, \
                         {tps:.1} tokens/s, GPU KV {:.1} MB, host KV {:.1} MB, copied {:?} \
                         MB/step, hit rate {hit:?}",
                        s.name,
                        way.name,
                        gpu_kv as f64 / 1e6,
                        host_kv as f64 / 1e6,
                        copied.map(|c| c / 1e6),
                    );
                    table.row(vec![
                        s.name.clone(),
                        way.name.into(),
                        batch.to_string(),
                        ctx.to_string(),
                        format!("{prefill_s:.2}"),
                        format!("{tps:.1}"),
                        format!("{:.1}", gpu_kv as f64 / 1e6),
                        format!("{:.1}", host_kv as f64 / 1e6),
                        copied.map_or("-".into(), |c| format!("{:.3}", c / 1e6)),
                        hit.map_or("-".into(), |h| format!("{h:.3}")),
                        fits.map_or("-".into(), |f| if f { "yes" } else { "no" }.into()),
                    ]);
                    records.push(serde_json::json!({
                        "model": s.name, "mode": way.name, "batch": batch, "context": ctx,
                        "prefill_s": prefill_s, "tokens_per_s": tps, "gpu_kv_bytes": gpu_kv,
                        "host_kv_bytes": host_kv, "copied_bytes_per_step": copied,
                        "hit_rate": hit,
                        "offload_path": dec.offload_path().map(OffloadPath::name),
                    }));
                }
            }
        }
    }
    let gpu = gpu_for(&rt.device)?;
    let record = serde_json::json!({
        "bench": "generate", "model": subjects.iter().map(|s| s.name.clone()).collect::<Vec<_>>(),
        "block": subjects.iter().map(|s| s.config.block).collect::<Vec<_>>(),
        "budget": subjects.iter().map(|s| s.config.topk).collect::<Vec<_>>(),
        "steps": a.steps, "gpu_kv_mb": a.gpu_kv_mb, "runs": records,
    });
    if !a.out.json {
        table.print();
        println!(
            "Greedy decoding of held-out prompts ({}), the host waiting for each token; sparse \
             and offload: the model's selection by the query (blocks, budget: {}); nosa: plus \
             the eviction head's blocks; offload: the cache in host memory, copies and hit rate \
             over the timed steps.",
            a.data.display(),
            subjects
                .iter()
                .map(|s| format!("{} x {}", s.config.block, s.config.topk))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    emit_record(&gpu, record, &a.out)?;
    Ok(ExitCode::SUCCESS)
}
