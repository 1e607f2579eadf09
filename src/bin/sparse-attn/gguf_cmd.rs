//! `gguf FILE`: what a GGUF model file holds (architecture, hyperparameters, tensor types,
//! tokenizer), read by `sparse_attn::gguf`, without a GPU.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use sparse_attn::Error;
use sparse_attn::gguf::{Gguf, LlamaParams, Value};

#[derive(Args)]
pub struct GgufArgs {
    /// The .gguf file (scripts/fetch-model.sh fetches SmolLM2-135M-Instruct into models/).
    pub file: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Write a small Llama with random weights to FILE instead of reading it: SmolLM2's
    /// layout and tensor types, d_model 64, 4 query / 2 kv heads of 16, a byte-level BPE
    /// tokenizer of 300 tokens (a model to try the page's model mode and the commands on
    /// without downloading one).
    #[arg(long)]
    pub random: bool,
    /// Layers of the random model.
    #[arg(long, default_value_t = 2, requires = "random")]
    pub layers: usize,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 1, requires = "random")]
    pub seed: u64,
}

pub fn gguf_cmd(a: &GgufArgs) -> Result<ExitCode, Error> {
    if a.random {
        let p = LlamaParams {
            layers: a.layers,
            ..LlamaParams::tiny(300, 4096)
        };
        if !(1..=64).contains(&a.layers) {
            return Err(Error::InvalidInput(format!(
                "--layers {}: a random model takes 1 to 64",
                a.layers
            )));
        }
        let bytes = sparse_attn::gguf::random_llama(&p, a.seed)?;
        sparse_attn::files::prepare_file(&a.file)?;
        sparse_attn::files::write_atomic(&a.file, &bytes)?;
        println!("wrote {} ({} bytes)", a.file.display(), bytes.len());
        return Ok(ExitCode::SUCCESS);
    }
    let bytes = std::fs::read(&a.file)
        .map_err(|e| Error::InvalidInput(format!("cannot read {}: {e}", a.file.display())))?;
    let g = Gguf::parse(&bytes)?;
    let mut types: BTreeMap<&str, (usize, u64)> = BTreeMap::new();
    for t in &g.tensors {
        let e = types.entry(t.ty.name()).or_default();
        e.0 += 1;
        e.1 += t.len();
    }
    let llama = LlamaParams::from_gguf(&g);
    let vocab = match g.get("tokenizer.ggml.tokens") {
        Some(Value::Array(t)) => t.len(),
        _ => 0,
    };
    let tokenizer = g
        .get("tokenizer.ggml.model")
        .and_then(Value::as_str)
        .unwrap_or("-");
    if a.json {
        let j = serde_json::json!({
            "file": a.file.display().to_string(), "bytes": bytes.len(), "version": g.version,
            "metadata_keys": g.metadata.len(), "tensors": g.tensors.len(),
            "architecture": g.get("general.architecture").and_then(Value::as_str),
            "types": types.iter().map(|(k, (n, v))| (k.to_string(), serde_json::json!({"tensors": n, "values": v}))).collect::<serde_json::Map<_, _>>(),
            "llama": llama.as_ref().ok().map(|p| serde_json::json!({
                "layers": p.layers, "d_model": p.d_model, "d_ff": p.d_ff, "heads_q": p.heads_q,
                "heads_kv": p.heads_kv, "head_dim": p.head_dim, "context": p.context,
                "rope_base": p.rope_base, "rms_eps": p.rms_eps, "vocab": p.vocab})),
            "tokenizer": {"model": tokenizer, "tokens": vocab},
        });
        println!("{j}");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{}: GGUF v{}, {} bytes, {} metadata keys, {} tensors",
        a.file.display(),
        g.version,
        bytes.len(),
        g.metadata.len(),
        g.tensors.len()
    );
    if let Some(name) = g.get("general.name").and_then(Value::as_str) {
        println!("name: {name}");
    }
    match &llama {
        Ok(p) => println!(
            "llama: {} layers, d_model {}, d_ff {}, {} query / {} kv heads (head_dim {}), \
             context {}, RoPE base {}, RMSNorm eps {:e}, vocabulary {}",
            p.layers,
            p.d_model,
            p.d_ff,
            p.heads_q,
            p.heads_kv,
            p.head_dim,
            p.context,
            p.rope_base,
            p.rms_eps,
            p.vocab
        ),
        Err(e) => println!("not a model this project loads: {e}"),
    }
    for (ty, (n, v)) in &types {
        println!("  {ty:<5} {n:>4} tensors, {v:>11} values");
    }
    println!("tokenizer: {tokenizer}, {vocab} tokens");
    Ok(ExitCode::SUCCESS)
}
