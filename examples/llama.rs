//! A GGUF model on this crate's own kernels (no Burn): tokenize a text with the file's
//! tokenizer, run the model over it, print the most likely next tokens with full attention and
//! with block-sparse attention in every layer, and the GPU time of one forward (full and
//! sparse, prefill of the whole text) with its arithmetic rate; then decode 64 tokens greedily
//! with a KV cache for a batch of copies of the text (full, sparse), printing the text and
//! tokens/s (wall time, the host reading each step's logits and taking their argmax).
//!
//!     scripts/fetch-model.sh
//!     cargo run --release --example llama -- models/SmolLM2-135M-Instruct.Q4_1.gguf "Once upon a time"
//!     # a longer prefill (the text repeated to N tokens) and a batch of B sequences
//!     cargo run --release --example llama -- MODEL.gguf "Once upon a time" 2048 16

use sparse_attn::gguf::Gguf;
use sparse_attn::gpu::Reps;
use sparse_attn::llama::{DecoderOptions, ForwardOptions, Llama, ModelAttention, top_tokens};
use sparse_attn::problem::{Scoring, SelectOptions};
use sparse_attn::tokenizer::Tokenizer;
use sparse_attn::{Error, Gpu, GpuOptions};

fn main() -> sparse_attn::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [file, text, rest @ ..] = args.as_slice() else {
        return Err(Error::InvalidInput(
            "usage: llama MODEL.gguf TEXT [TOKENS [BATCH]]".into(),
        ));
    };
    let num = |i: usize, what: &str| -> sparse_attn::Result<Option<usize>> {
        rest.get(i)
            .map(|n| {
                n.parse()
                    .map_err(|_| Error::InvalidInput(format!("{what} must be a number, got {n}")))
            })
            .transpose()
    };
    let (want, batch) = (num(0, "TOKENS")?, num(1, "BATCH")?.unwrap_or(1));
    let bytes =
        std::fs::read(file).map_err(|e| Error::InvalidInput(format!("cannot read {file}: {e}")))?;
    let gpu = Gpu::new(&GpuOptions::default())?;
    let tok = Tokenizer::from_gguf(&Gguf::parse(&bytes)?)?;
    let model = Llama::from_gguf(&gpu, &bytes)?;
    let p = model.params.clone();
    let mut ids = tok.encode(text)?;
    if let Some(n) = want {
        let one = ids.clone();
        ids = one.iter().cycle().take(n.max(1)).copied().collect();
    }
    let n = ids.len();
    println!(
        "{} on {}: {} layers, d_model {}, {} weights ({:.0} MiB f32 on the GPU); {n} tokens",
        file,
        gpu.adapter(),
        p.layers,
        p.d_model,
        model.weight_bytes() / 4,
        model.weight_bytes() as f64 / 1048576.0
    );
    // Blocks of 64, 16 per query (1024 tokens) with the first and two local blocks: as
    // `generate --gguf --attention sparse`; fewer where the text is short.
    let blocks = n.div_ceil(64);
    let sparse = SelectOptions {
        block: 64,
        k: 16.min(blocks),
        n_init: (blocks > 3) as usize,
        n_local: if blocks > 3 { 2 } else { 0 },
        scoring: Scoring::InfLlmV2,
        causal: true,
        scale: None,
        evict: 0,
    };
    // Multiply-adds of the linear layers (the head on the last token only) and of attention.
    let (d, kv, ff) = (p.d_model, p.heads_kv * p.head_dim, p.d_ff);
    let per_token = p.layers * (2 * d * d + 2 * d * kv + 3 * d * ff);
    for (name, attention, keys) in [
        ("full", ModelAttention::Full, (n + 1) as f64 / 2.0),
        (
            "sparse",
            ModelAttention::Sparse(sparse),
            (sparse.k * 64).min(n) as f64,
        ),
    ] {
        let opts = ForwardOptions {
            attention,
            ..ForwardOptions::new()
        };
        let mut enc = gpu.encoder();
        let f = model.forward(&gpu, &mut enc, &ids, &opts)?;
        gpu.queue().submit([enc.finish()]);
        let top = top_tokens(&gpu.read(&f.logits)?, 5);
        let shown: Vec<String> = top
            .iter()
            .map(|&(id, pr)| Ok(format!("{:?} {:.3}", tok.decode(&[id], false)?, pr)))
            .collect::<sparse_attn::Result<_>>()?;
        let t = gpu.time(Reps::Target(1.0), |enc| {
            model.forward(&gpu, enc, &ids, &opts).map(|_| ())
        })?;
        let flops = 2.0 * (per_token * n + d * p.vocab) as f64
            + 4.0 * (n * p.heads_q * p.head_dim) as f64 * keys;
        println!(
            "{name:>6}: next {}; forward {:.2} ms ({:.2} TFLOP/s, {:.0} tokens/s)",
            shown.join(", "),
            t.seconds * 1e3,
            flops / t.seconds / 1e12,
            n as f64 / t.seconds
        );
    }
    // Decoding: the text as the prompt of `batch` sequences, then 64 greedy tokens.
    let steps = 64;
    for (name, attention) in [
        ("full", ModelAttention::Full),
        ("sparse", ModelAttention::Sparse(sparse)),
    ] {
        let opts = DecoderOptions {
            batch,
            // The greedy steps, then the timed ones below.
            capacity: n + steps + 16,
            attention,
            offload_slots: None,
        };
        let mut dec = model.decoder(&gpu, &opts)?;
        let argmax = |l: &[f32]| -> Vec<u32> {
            l.chunks_exact(p.vocab)
                .map(|r| (0..r.len()).max_by(|&a, &b| r[a].total_cmp(&r[b])).unwrap() as u32)
                .collect()
        };
        let t0 = std::time::Instant::now();
        let prompt: Vec<u32> = (0..batch).flat_map(|_| ids.iter().copied()).collect();
        let mut enc = gpu.encoder();
        let l = dec.step(&gpu, &mut enc, &prompt)?;
        gpu.queue().submit([enc.finish()]);
        let mut next = argmax(&gpu.read(&l)?);
        let prefill = t0.elapsed().as_secs_f64();
        let mut out = vec![next[0]];
        let t0 = std::time::Instant::now();
        for _ in 1..steps {
            let mut enc = gpu.encoder();
            let l = dec.step(&gpu, &mut enc, &next)?;
            gpu.queue().submit([enc.finish()]);
            next = argmax(&gpu.read(&l)?);
            out.push(next[0]);
        }
        let dt = t0.elapsed().as_secs_f64();
        // The same steps recorded back to back in one submission: the GPU's own time per step
        // (against the wall time above, which adds recording, submission and the readback).
        let gpu_t = gpu.time(Reps::Fixed(8), |enc| dec.step(&gpu, enc, &next).map(|_| ()))?;
        println!(
            "{name:>6} decoding, batch {batch}: prefill {:.1} ms, {:.1} ms/step ({:.1} ms of GPU \
             time, {:?}), {:.0} tokens/s: {:?}",
            prefill * 1e3,
            dt / (steps - 1) as f64 * 1e3,
            gpu_t.seconds * 1e3,
            gpu_t.source,
            (batch * (steps - 1)) as f64 / dt,
            tok.decode(&out, false)?
        );
    }
    Ok(())
}
