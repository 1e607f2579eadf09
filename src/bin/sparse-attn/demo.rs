//! `demo`: the first thing a new user runs. Every kernel family against the f64 references on
//! this device (the `selfcheck`), then the speed of full and block-sparse attention at the
//! shape asked for (the benchmarks' drivers). Without a GPU it says how to get one and runs the
//! CPU reference instead.

use std::process::ExitCode;
use std::time::Instant;

use clap::Args;
use sparse_attn::reference::{self, Rng};
use sparse_attn::{
    AttnOptions, AttnShape, Error, FullAttention, FullConfig, Gpu, GpuOptions, SelectOptions,
};

use crate::bench::{SparseRun, bench_full, bench_sparse};
use crate::selfcheck::{print_checks, run_checks};

#[derive(Args)]
pub struct DemoArgs {
    #[arg(long, default_value_t = 512)]
    pub seq: usize,
    #[arg(long, default_value_t = 8)]
    pub heads: usize,
    #[arg(long, default_value_t = 2)]
    pub kv_heads: usize,
    #[arg(long, default_value_t = 64)]
    pub head_dim: usize,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

pub fn demo(opts: &GpuOptions, a: &DemoArgs) -> Result<ExitCode, Error> {
    let shape = AttnShape::new(1, a.heads, a.kv_heads, a.seq, a.head_dim);
    let att_opts = AttnOptions::causal(true);
    shape.validate(&att_opts)?;
    let gpu = match Gpu::new(opts) {
        Ok(g) => g,
        // A filter that matches none of the adapters there are is a mistake to report; only
        // a machine without any adapter falls back to the CPU reference.
        Err(e @ Error::NoAdapter { .. }) if !sparse_attn::gpu::list_adapters().is_empty() => {
            return Err(e);
        }
        Err(e @ Error::NoAdapter { .. }) => {
            println!("{e}");
            return demo_cpu_only(shape, a.seed);
        }
        Err(e) => return Err(e),
    };
    println!("device: {}", gpu.adapter());
    println!(
        "correctness: every kernel family against the f64 CPU reference on random inputs (seed \
         {}), relative L2 error (tolerance {:.0e}):",
        a.seed,
        sparse_attn::selfcheck::TOLERANCE
    );
    let checks = run_checks(&gpu, a.seed)?;
    print_checks(&checks);
    let ok = checks.iter().all(|c| c.ok);

    println!(
        "speed: causal attention, batch 1, {} query heads / {} kv heads, seq {}, head_dim {}",
        a.heads, a.kv_heads, a.seq, a.head_dim
    );
    let att = FullAttention::new(&gpu, shape, &FullConfig::new(att_opts))?;
    println!("  kernel variants: {}", att.variants().name());
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
        "  full: forward {:.3} ms ({:.3} TFLOP/s), backward {:.3} ms ({:.3} TFLOP/s) [{:?}]",
        r.fwd_s * 1e3,
        r.fwd_tflops,
        r.bwd_s.unwrap_or(0.0) * 1e3,
        r.bwd_tflops.unwrap_or(0.0),
        r.timer
    );
    // The same shape through SSA's sparse stream: keep a quarter of the blocks.
    let block = 16;
    let nb = a.seq.div_ceil(block);
    let select = SelectOptions {
        block,
        k: (nb / 4).max(1),
        ..SelectOptions::ssa()
    };
    // One repetition: the demo must stay quick on software adapters too.
    let s = bench_sparse(&gpu, shape, &SparseRun::new(select))?;
    println!(
        "  block-sparse (SSA selection, blocks of {block}, keep {} of {nb}): selection {:.3} ms + \
         sparse forward {:.3} ms vs dense forward {:.3} ms ({:.2}x); sparse backward {:.3} ms vs \
         dense {:.3} ms",
        select.k,
        s.select_s * 1e3,
        s.sparse_fwd_s * 1e3,
        s.dense_fwd_s * 1e3,
        s.speedup(),
        s.sparse_bwd_s.unwrap_or(0.0) * 1e3,
        s.dense_bwd_s.unwrap_or(0.0) * 1e3,
    );
    if ok {
        println!("demo: PASS");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("demo: FAIL (a GPU result differs from the reference)");
        Ok(ExitCode::FAILURE)
    }
}

/// Multiply-adds of the CPU demo's forward, at most (about a second of f64 work).
const CPU_DEMO_WORK: usize = 1 << 28;

/// No GPU: still show the computation, on the CPU reference: the shape asked for, or a smaller
/// one where that would take long (said so).
fn demo_cpu_only(asked: AttnShape, seed: u64) -> Result<ExitCode, Error> {
    let work = asked.q_len().saturating_mul(asked.seq_k);
    let shape = if work <= CPU_DEMO_WORK {
        asked
    } else {
        println!(
            "(the shape asked for needs {work} multiply-adds, too many for the CPU reference; \
             it runs 128 tokens instead)"
        );
        // At most 8 query heads where the group allows, keeping the GQA ratio.
        let g = asked.group();
        let kv = (8 / g).clamp(1, asked.heads_kv);
        AttnShape::new(1, kv * g, kv, 128, asked.head_dim)
    };
    let opts = AttnOptions::causal(true);
    println!(
        "running the CPU reference instead: causal attention, {} query heads / {} kv heads, seq \
         {}, head_dim {} (seed {seed})",
        shape.heads_q, shape.heads_kv, shape.seq_q, shape.head_dim
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
