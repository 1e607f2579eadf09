//! `generate`: text from a trained checkpoint, decoded with a KV cache on the GPU or offloaded
//! NOSA's way, streamed as it is produced; ends with tokens/s, hit rate and KV memory. Needs
//! the training stack (`--features train`).

use std::process::ExitCode;

use sparse_attn::{Error, GpuOptions};

#[cfg(not(feature = "train"))]
pub use crate::train::TrainArgs as GenerateArgs;

#[cfg(not(feature = "train"))]
pub fn generate_cmd(_: &GpuOptions, _: &GenerateArgs) -> Result<ExitCode, Error> {
    Err(Error::NotBuilt(
        "`generate` runs trained models, which needs the training stack (Burn); rebuild with it: \
         `cargo run --release --features train -- generate ...`"
            .into(),
    ))
}

#[cfg(feature = "train")]
#[derive(clap::Args)]
pub struct GenerateArgs {
    /// Checkpoint folder (from `train --out`).
    #[arg(long, required_unless_present = "gguf", conflicts_with = "gguf")]
    pub ckpt: Option<std::path::PathBuf>,
    /// A pretrained Llama-family model in a GGUF file (e.g. SmolLM2-135M-Instruct, fetched by
    /// scripts/fetch-model.sh): its tokenizer, its chat template (unless --raw).
    #[arg(long)]
    pub gguf: Option<std::path::PathBuf>,
    /// The text to continue (a checkpoint's tokens are bytes), or with --gguf the user's message
    /// (wrapped in the model's chat template unless --raw). Given several times: a batch,
    /// decoded together (each as it would be alone), printed when done instead of streamed.
    #[arg(long, required = true)]
    pub prompt: Vec<String>,
    /// With --gguf: give the prompt to the model as it is, without the chat template.
    #[arg(long)]
    pub raw: bool,
    /// With --gguf: the system message of the chat (default: the template's own).
    #[arg(long)]
    pub system: Option<String>,
    /// With --gguf: keep generating past the end-of-sequence token.
    #[arg(long)]
    pub ignore_eos: bool,
    /// With --gguf: block size of sparse attention (blocks per query: --budget, default 16).
    #[arg(long, default_value_t = 64)]
    pub block: usize,
    /// Tokens to generate.
    #[arg(long, default_value_t = 200)]
    pub tokens: usize,
    /// Sampling temperature (0: greedy).
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f64,
    /// Nucleus sampling: the smallest set of tokens holding this much probability.
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f64,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// full, sparse (the model's selector by the query) or nosa (with the eviction head).
    #[arg(long, default_value = "sparse")]
    pub attention: String,
    /// Blocks kept per step (default: the model's budget).
    #[arg(long)]
    pub budget: Option<usize>,
    /// Keep the KV cache in host memory; only the selected blocks go to the GPU.
    #[arg(long)]
    pub offload: bool,
    /// With --offload: GPU memory for the KV cache, in MB (slots, pooled selection state,
    /// lists; as many slots as fit; default: the least, one slot per selected block).
    #[arg(long)]
    pub gpu_kv_mb: Option<f64>,
    /// With --offload: how blocks reach the GPU: in-place (kernels read host memory; native
    /// adapters with MAPPABLE_PRIMARY_BUFFERS), staged (the host writes missing blocks each
    /// step; anywhere) or auto (in-place where the adapter allows it).
    #[arg(long, default_value = "auto", value_parser = crate::report::offload_path)]
    pub offload_path: sparse_attn::decode::OffloadPath,
}

#[cfg(feature = "train")]
pub fn generate_cmd(opts: &GpuOptions, a: &GenerateArgs) -> Result<ExitCode, Error> {
    use std::io::Write;
    use std::time::Instant;

    use sparse_attn::train::Runtime;
    use sparse_attn::train::generate::{Attention, Decoder, GenerateOptions, Sampler};
    use sparse_attn::train::llama::{Pretrained, SparseSettings};
    use sparse_attn::train::trainer::load;

    let attention = Attention::parse(&a.attention)?;
    let sampler = Sampler::new(a.temperature, a.top_p, a.seed)?;
    if a.prompt.iter().any(String::is_empty) {
        return Err(Error::InvalidInput(
            "a prompt is empty: give at least one character".into(),
        ));
    }
    if a.tokens == 0 {
        return Err(Error::InvalidInput(
            "--tokens 0: generate at least one token".into(),
        ));
    }
    if a.gpu_kv_mb.is_some() && !a.offload {
        return Err(Error::InvalidInput(
            "--gpu-kv-mb sets the GPU budget of --offload".into(),
        ));
    }
    let offload_path = a.offload_path;
    if offload_path != sparse_attn::decode::OffloadPath::Auto && !a.offload {
        return Err(Error::InvalidInput(
            "--offload-path chooses the path of --offload".into(),
        ));
    }
    let rt = Runtime::new(&Runtime::gpu_options(&GpuOptions {
        host_memory: a.offload && offload_path != sparse_attn::decode::OffloadPath::Staged,
        ..opts.clone()
    }))?;
    if a.ckpt.is_some() && (a.raw || a.system.is_some() || a.ignore_eos) {
        return Err(Error::InvalidInput(
            "--raw, --system and --ignore-eos are for --gguf models (a checkpoint's tokens are \
             bytes)"
                .into(),
        ));
    }
    let (model, model_cfg, tokenizer) = match (&a.ckpt, &a.gguf) {
        (Some(dir), _) => {
            let (model, cfg) = load(dir, &rt.device)?;
            (model, cfg.model, None)
        }
        (None, Some(file)) => {
            let sparse = SparseSettings {
                block: a.block,
                ..SparseSettings::default()
            };
            let p = Pretrained::load(file, &rt.device, sparse)?;
            (p.model, p.config, Some(p.tokenizer))
        }
        (None, None) => unreachable!("clap requires --ckpt or --gguf"),
    };
    let m = match a.budget {
        Some(k) => model_cfg.with_topk(k),
        None => model_cfg.clone(),
    };
    let mut texts = Vec::with_capacity(a.prompt.len());
    let mut prompts = Vec::with_capacity(a.prompt.len());
    for p in &a.prompt {
        let text = match (&tokenizer, a.raw) {
            (Some(t), false) => t.chat_prompt(p, a.system.as_deref())?,
            _ => p.clone(),
        };
        prompts.push(match &tokenizer {
            Some(t) => t.encode(&text)?,
            None => text.bytes().map(u32::from).collect::<Vec<u32>>(),
        });
        texts.push(text);
    }
    let eos = match (&tokenizer, a.ignore_eos) {
        (Some(t), false) => t.eos,
        _ => None,
    };
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let capacity = longest + a.tokens;
    let gpu_kv_budget = match a.gpu_kv_mb {
        Some(mb) if !(mb.is_finite() && mb > 0.0) => {
            return Err(Error::InvalidInput(format!(
                "--gpu-kv-mb {mb}: need a positive number"
            )));
        }
        mb => mb.map(|mb| (mb * 1e6) as u64),
    };
    let gopts = GenerateOptions {
        budget: a.budget,
        offload_slots: a.offload.then_some(m.topk),
        gpu_kv_budget,
        offload_path,
        batch: prompts.len(),
        ..GenerateOptions::new(attention, capacity)
    };
    let mut dec = Decoder::new(&rt, model, &model_cfg, &gopts)?;
    let mut sampler = sampler;
    let mut out = std::io::stdout().lock();
    // A chat shows the answer only; a continuation starts with the text it continues.
    let echo = tokenizer.is_none() || a.raw;
    if prompts.len() > 1 {
        let refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
        let t0 = Instant::now();
        let new = dec.generate(&refs, a.tokens, &mut sampler)?;
        let secs = t0.elapsed().as_secs_f64();
        let mut generated = 0;
        for (i, (text, toks)) in texts.iter().zip(&new).enumerate() {
            // Each sequence ends at its end-of-sequence token (the batch runs on to the last).
            let n = toks
                .iter()
                .position(|&t| Some(t) == eos)
                .unwrap_or(toks.len());
            generated += n;
            // A checkpoint's tokens are bytes, written as they are (as the stream does).
            let body = match &tokenizer {
                Some(t) => t.decode(&toks[..n], false)?.into_bytes(),
                None => toks[..n].iter().map(|&t| t as u8).collect(),
            };
            let _ = writeln!(out, "== {} of {} ==", i + 1, prompts.len());
            if echo {
                let _ = out.write_all(text.as_bytes());
            }
            let _ = out.write_all(&body);
            let _ = writeln!(out);
        }
        let _ = out.flush();
        eprintln!(
            "{} attention, {} sequences, {} prompt tokens: {} new tokens a sequence in {secs:.2} \
             s ({:.1} tokens/s, prefill included; {generated} before end-of-sequence); {}",
            attention.name(),
            prompts.len(),
            prompts.iter().map(Vec::len).sum::<usize>(),
            a.tokens,
            (prompts.len() * a.tokens) as f64 / secs,
            memory_line(&dec)?
        );
        return Ok(ExitCode::SUCCESS);
    }
    let (text, prompt) = (&texts[0], &prompts[0]);
    if echo {
        let _ = out.write_all(text.as_bytes());
    }
    let _ = out.flush();
    let mut stream = tokenizer.as_ref().map(|t| t.stream(false));
    let t0 = Instant::now();
    let logits = dec.prefill(prompt, prompt.len())?;
    let t1 = Instant::now();
    let mut next = sampler.sample(logits)?[0];
    let mut generated = 0;
    for i in 0..a.tokens {
        if Some(next) == eos {
            break;
        }
        match &mut stream {
            Some(s) => {
                let _ = out.write_all(s.step(next)?.as_bytes());
            }
            None => {
                let _ = out.write_all(&[next as u8]);
            }
        }
        let _ = out.flush();
        generated += 1;
        if i + 1 == a.tokens {
            break;
        }
        let l = dec.step(&[next])?;
        next = sampler.sample(l)?[0];
    }
    let gen_s = t1.elapsed().as_secs_f64();
    let _ = writeln!(out);
    eprintln!(
        "{} attention, {} prompt tokens in {:.2} s, {} generated at {:.1} tokens/s; {}",
        attention.name(),
        prompt.len(),
        (t1 - t0).as_secs_f64(),
        generated,
        generated as f64 / gen_s,
        memory_line(&dec)?
    );
    Ok(ExitCode::SUCCESS)
}

/// The summary's end: the offloaded cache's hit rate and the KV cache's memory.
#[cfg(feature = "train")]
fn memory_line(dec: &sparse_attn::train::generate::Decoder) -> Result<String, Error> {
    let (gpu_kv, host_kv) = dec.kv_bytes();
    let hit = match dec.offload_stats()? {
        Some(s) => format!(
            "{:.3} ({} of {} selected blocks already on the GPU; {} copies)",
            s.hit_rate(),
            s.hits,
            s.selected,
            dec.offload_path().map_or("-", |p| p.name())
        ),
        None => "- (the cache is on the GPU)".into(),
    };
    Ok(format!(
        "hit rate {hit}; KV cache: {:.2} MB on the GPU{}",
        gpu_kv as f64 / 1e6,
        if host_kv > 0 {
            format!(", {:.2} MB in host memory", host_kv as f64 / 1e6)
        } else {
            String::new()
        }
    ))
}
