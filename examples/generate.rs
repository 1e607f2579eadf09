//! Text from a trained checkpoint with the library's `Decoder`: NOSA attention, the KV cache in
//! host memory with only the selected blocks on the GPU, greedy then sampled.
//!
//!     cargo run --release --features train -- train --mode nosa --out runs/nosa --steps 300
//!     cargo run --release --features train --example generate -- runs/nosa "ROMEO:"

use sparse_attn::GpuOptions;
use sparse_attn::train::Runtime;
use sparse_attn::train::generate::{Attention, Decoder, GenerateOptions, Sampler};
use sparse_attn::train::trainer::load;

fn main() -> sparse_attn::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(ckpt), Some(prompt)) = (args.next(), args.next()) else {
        eprintln!("usage: generate CHECKPOINT_DIR PROMPT");
        std::process::exit(2);
    };
    // Host memory for the offloaded cache (where the adapter has it).
    let rt = Runtime::new(&GpuOptions {
        host_memory: true,
        ..Default::default()
    })?;
    let (model, cfg) = load(ckpt.as_ref(), &rt.device)?;
    let nosa = cfg.model.has_evict_head();
    let attention = if nosa {
        Attention::Nosa
    } else {
        Attention::Sparse
    };
    let tokens = 120;
    let opts = GenerateOptions {
        // The fewest GPU slots one step's selection needs.
        offload_slots: rt.gpu.has_host_memory().then_some(cfg.model.topk),
        ..GenerateOptions::new(attention, prompt.len() + tokens)
    };
    for temperature in [0.0, 0.8] {
        let mut dec = Decoder::new(&rt, model.clone(), &cfg.model, &opts)?;
        let mut sampler = Sampler::new(temperature, 0.95, 7)?;
        let ids: Vec<u32> = prompt.bytes().map(u32::from).collect();
        let logits = dec.prefill(&ids, ids.len())?;
        let mut text = prompt.as_bytes().to_vec();
        let mut next = sampler.sample(logits)?[0];
        for _ in 1..tokens {
            text.push(next as u8);
            next = sampler.sample(dec.step(&[next])?)?[0];
        }
        println!(
            "--- temperature {temperature}, {} attention:",
            attention.name()
        );
        println!("{}", String::from_utf8_lossy(&text));
        if let Some(s) = dec.offload_stats()? {
            let (gpu, host) = dec.kv_bytes();
            println!(
                "hit rate {:.3}; KV cache {:.2} MB on the GPU, {:.2} MB in host memory",
                s.hit_rate(),
                gpu as f64 / 1e6,
                host as f64 / 1e6
            );
        }
    }
    Ok(())
}
