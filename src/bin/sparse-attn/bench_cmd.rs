//! `bench full` and `bench sparse`: time the kernels on real shapes, print a table and a
//! JSON record (`report`).

use std::process::ExitCode;

use clap::Args;
use sparse_attn::gpu::{DType, Gpu, GpuOptions, Reps, Storage};
use sparse_attn::ops::attention::{Variant, Variants, auto_variants, variant_supported};
use sparse_attn::ops::select::{ScoreKernel, TopK};
use sparse_attn::problem::check_head_dim;
use sparse_attn::{AttnOptions, Error, FullAttention, FullConfig, SelectConfig};

use crate::args::{Mask, SelectArgs, ShapeArgs, parse_dtype, parse_kernel};
use crate::bench::{FullBench, SparseRun, bench_full, bench_sparse};
use crate::report::{Output, Table, emit_record, ms, positive_f64};

#[derive(Args)]
pub struct FullArgs {
    #[command(flatten)]
    pub shape: ShapeArgs,
    #[arg(long, value_enum, default_value_t = Mask::Causal)]
    pub mask: Mask,
    /// Kernel variants to time, comma-separated: all, auto (the library's choice per pass),
    /// portable, large, xl, coop (tensor cores, forward and backward; f16 only), coop-fwd (tensor
    /// cores forward, the largest f32-arithmetic tile backward). A prefix picks the storage: `f16:xl`, `f16p:portable` (f16 packed in u32
    /// words, what browsers without shader-f16 run), `f16:coop`, `f16:auto`; none = f32.
    #[arg(long, value_delimiter = ',', default_values_t = vec!["all".to_string()])]
    pub variant: Vec<String>,
    #[command(flatten)]
    pub stats: PipelineStats,
    /// Skip the backward pass.
    #[arg(long)]
    pub no_backward: bool,
    /// Target seconds per timed submission (repetitions are chosen to fill it).
    #[arg(long, default_value_t = 0.5, value_parser = positive_f64)]
    pub target_seconds: f64,
    #[command(flatten)]
    pub out: Output,
}

#[derive(Args)]
pub struct SparseArgs {
    #[command(flatten)]
    pub shape: ShapeArgs,
    #[command(flatten)]
    pub select: SelectArgs,
    /// Skip the backward passes.
    #[arg(long)]
    pub no_backward: bool,
    /// Also time every kernel of the selection, sparse forward and backward on its own
    /// (timestamps around each dispatch).
    #[arg(long)]
    pub stages: bool,
    /// Target seconds per timed submission.
    #[arg(long, default_value_t = 0.3, value_parser = positive_f64)]
    pub target_seconds: f64,
    /// Storage of q, k, v, O and gradients: f32 or f16 (f32 accumulation either way).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Sparse forward kernel: auto (the library's choice), portable, rows (small groups,
    /// causal), or coop (tensor cores: f16, up to 16 query heads per kv head, blocks of a
    /// multiple of 16).
    #[arg(long, default_value = "auto")]
    pub forward: String,
    /// Sparse backward kernels: auto, portable, rows (dQ by row kernels), or coop (tensor
    /// cores; same limits as the forward's).
    #[arg(long, default_value = "auto")]
    pub backward: String,
    /// Top-k kernel of the selection: auto (the library's choice), sort (bitonic, anywhere), or
    /// subgroup (subgroup arg-max rounds; needs subgroup operations).
    #[arg(long, default_value = "auto")]
    pub topk_kernel: String,
    /// Block-score kernel of the selection: auto (the library's choice), tiled (f32, anywhere),
    /// or coop (tensor cores: f16, groups that divide 128).
    #[arg(long, default_value = "auto")]
    pub score_kernel: String,
    /// Sparse attention with a random per-key bias (NOSA), forward and backward (d bias).
    #[arg(long)]
    pub bias: bool,
    #[command(flatten)]
    pub stats: PipelineStats,
    #[command(flatten)]
    pub out: Output,
}

pub fn bench_full_cmd(opts: &GpuOptions, a: &FullArgs) -> Result<ExitCode, Error> {
    a.out.prepare()?;
    let gpu = Gpu::new(opts)?;
    let masks: &[bool] = match a.mask {
        Mask::Causal => &[true],
        Mask::Full => &[false],
        Mask::Both => &[true, false],
    };
    let mut results: Vec<FullBench> = Vec::new();
    let mut table = Table::new(&[
        "variant", "batch", "heads", "kv", "seq", "d", "causal", "|", "fwd ms", "TFLOP/s", "GB/s",
        "|", "bwd ms", "TFLOP/s", "|", "vs base",
    ]);
    for &d in &a.shape.head_dim {
        check_head_dim(d)?;
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
                    let att = FullAttention::new(
                        &gpu,
                        a.shape.shape(a.shape.seq[0], d),
                        &FullConfig::new(AttnOptions::default()).dtype(storage.dtype()),
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
                    let s = &r.shape;
                    table.row(vec![
                        format!("{} {}", storage.name(), v.name()),
                        s.batch.to_string(),
                        s.heads_q.to_string(),
                        s.heads_kv.to_string(),
                        s.seq_q.to_string(),
                        s.head_dim.to_string(),
                        causal.to_string(),
                        format!("{:.3}", r.fwd_s * 1e3),
                        format!("{:.2}", r.fwd_tflops),
                        format!("{:.1}", r.fwd_gbps),
                        ms(r.bwd_s),
                        r.bwd_tflops.map_or("-".into(), |x| format!("{x:.2}")),
                        format!("{:.2}x", b / r.fwd_s),
                    ]);
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
        println!("device: {}", gpu.adapter());
        table.print();
        println!(
            "TFLOP/s count visible (query, key) pairs only (causal ~ half); backward FLOPs = 2.5 x \
             forward; GB/s = compulsory traffic (q, k, v, O, LSE); 'vs base' = forward speed over \
             the first variant of the row group."
        );
    }
    a.stats.print(&gpu)?;
    Ok(ExitCode::SUCCESS)
}

pub fn bench_sparse_cmd(opts: &GpuOptions, a: &SparseArgs) -> Result<ExitCode, Error> {
    a.out.prepare()?;
    let gpu = Gpu::new(opts)?;
    let mut table = Table::new(&[
        "batch",
        "heads",
        "kv",
        "seq",
        "d",
        "B",
        "k",
        "|",
        "select ms",
        "sparse ms",
        "dense ms",
        "|",
        "speedup",
        "sel %",
        "|",
        "eq TF/s",
        "TF/s",
        "|",
        "sp bwd ms",
        "dn bwd ms",
        "bwd x",
    ]);
    let mut stages = Vec::new();
    let mut results = Vec::new();
    for &d in &a.shape.head_dim {
        for &seq in &a.shape.seq {
            let shape = a.shape.shape(seq, d);
            let sel = a.select.options()?;
            let run = SparseRun {
                select: SelectConfig::new(sel)
                    .dtype(parse_dtype(&a.dtype)?)
                    .topk(TopK::parse(&a.topk_kernel)?)
                    .scores(ScoreKernel::parse(&a.score_kernel)?),
                forward: parse_kernel(&a.forward)?,
                backward: parse_kernel(&a.backward)?,
                with_backward: !a.no_backward,
                reps: Reps::Target(a.target_seconds),
                stages: a.stages,
                bias: a.bias,
            };
            let r = bench_sparse(&gpu, shape, &run)?;
            let s = &r.shape;
            table.row(vec![
                s.batch.to_string(),
                s.heads_q.to_string(),
                s.heads_kv.to_string(),
                s.seq_q.to_string(),
                s.head_dim.to_string(),
                a.select.block.to_string(),
                a.select.topk.to_string(),
                format!("{:.3}", r.select_s * 1e3),
                format!("{:.3}", r.sparse_fwd_s * 1e3),
                format!("{:.3}", r.dense_fwd_s * 1e3),
                format!("{:.2}x", r.speedup()),
                format!("{:.1}%", 100.0 * r.select_s / (r.select_s + r.sparse_fwd_s)),
                format!("{:.2}", r.dense_equiv_tflops),
                format!("{:.2}", r.sparse_tflops),
                ms(r.sparse_bwd_s),
                ms(r.dense_bwd_s),
                r.dense_bwd_s
                    .zip(r.sparse_bwd_s)
                    .map_or("-".into(), |(d, s)| format!("{:.2}x", d / s)),
            ]);
            for (kernel, secs, n) in &r.stages {
                stages.push(format!(
                    "  seq {seq} d {d}: {kernel:<32} {:>9.3} ms  ({n} dispatches)",
                    secs * 1e3
                ));
            }
            results.push(r);
        }
    }
    let record = serde_json::json!({
        "results": results.iter().map(|r| r.to_json()).collect::<Vec<_>>(),
    });
    emit_record(&gpu, record, &a.out)?;
    if !a.out.json {
        println!("device: {}", gpu.adapter());
        table.print();
        for s in &stages {
            println!("{s}");
        }
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
        let mut scores: Vec<&str> = results.iter().map(|r| r.scores).collect();
        scores.dedup();
        println!("selection block-score kernel: {}", scores.join(", "));
        println!(
            "causal. speedup = dense causal forward / (selection + sparse forward); sel % = \
             selection's share of that time; eq TF/s = dense causal FLOPs per second of that time; \
             TF/s = FLOPs of the pairs the sparse forward attends to, per second of its own time; \
             bwd x = dense backward / sparse backward (the selection is reused from the forward)."
        );
    }
    a.stats.print(&gpu)?;
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct PipelineStats {
    /// After the run, print what the Vulkan driver made of every kernel it used (registers,
    /// spills, ...: VK_KHR_pipeline_executable_properties; native Vulkan only).
    #[arg(long)]
    pub pipeline_stats: bool,
}

impl PipelineStats {
    /// With the flag: every pipeline the run built, with the driver's statistics of it
    /// (`gpu::stats`).
    fn print(&self, gpu: &Gpu) -> Result<(), Error> {
        if !self.pipeline_stats {
            return Ok(());
        }
        println!("pipeline statistics (the Vulkan driver's, per kernel):");
        for k in sparse_attn::gpu::stats::kernel_stats(gpu)? {
            println!("{}  [{}]", k.label, k.constants);
            for (name, stats) in &k.executables {
                let s: Vec<String> = stats.iter().map(|(n, v)| format!("{n}={v}")).collect();
                println!("    {name}: {}", s.join(", "));
            }
        }
        Ok(())
    }
}
