//! Benchmark drivers shared by the CLI: time kernels on real shapes and report throughput.

use crate::error::Result;
use crate::gpu::{DType, Gpu, Reps, TimerSource};
use crate::ops::attention::{AttnGrads, AttnOutput, FullAttention, Variants};
use crate::shape::{AttnOptions, AttnShape};

/// One measured configuration.
#[derive(Clone, Debug)]
pub struct FullBench {
    pub shape: AttnShape,
    pub causal: bool,
    pub variants: Variants,
    pub fwd_s: f64,
    pub fwd_tflops: f64,
    /// Compulsory traffic of the forward pass (read q, k, v; write O, LSE) per second.
    pub fwd_gbps: f64,
    pub bwd_s: Option<f64>,
    pub bwd_tflops: Option<f64>,
    pub reps: u32,
    pub timer: TimerSource,
}

/// Time forward (and backward) full attention for one shape and variant.
pub fn bench_full(
    gpu: &Gpu,
    shape: AttnShape,
    opts: AttnOptions,
    variants: Variants,
    backward: bool,
    target_s: f64,
) -> Result<FullBench> {
    let att = FullAttention::with_variants(gpu, shape, opts, variants)?;
    // Inputs are made on the GPU: host generation and upload of GBs would dominate a sweep.
    // Uniform in [-sqrt(3), sqrt(3)) has unit variance, like the tests' normal inputs.
    let s3 = 3f32.sqrt();
    let q = gpu.random_uniform(&shape.q_dims(), 1, s3)?;
    let k = gpu.random_uniform(&shape.kv_dims(), 2, s3)?;
    let v = gpu.random_uniform(&shape.kv_dims(), 3, s3)?;
    let out = AttnOutput {
        o: gpu.empty(&shape.q_dims(), DType::F32)?,
        lse: gpu.empty(&shape.lse_dims(), DType::F32)?,
    };
    let fwd =
        |enc: &mut wgpu::CommandEncoder| att.encode_forward(gpu, enc, &q, &k, &v, &out.o, &out.lse);
    let t = gpu.time(Reps::Target(target_s), fwd)?;
    let flops = shape.forward_flops(opts.causal);
    let bytes = 4.0 * (2 * shape.q_len() + 2 * shape.kv_len() + shape.lse_len()) as f64;
    let mut r = FullBench {
        shape,
        causal: opts.causal,
        variants,
        fwd_s: t.seconds,
        fwd_tflops: flops / t.seconds * 1e-12,
        fwd_gbps: bytes / t.seconds * 1e-9,
        bwd_s: None,
        bwd_tflops: None,
        reps: t.reps,
        timer: t.source,
    };
    if backward {
        let d_o = gpu.random_uniform(&shape.q_dims(), 4, s3)?;
        let rowd = gpu.empty(&shape.lse_dims(), DType::F32)?;
        let grads = AttnGrads {
            dq: gpu.empty(&shape.q_dims(), DType::F32)?,
            dk: gpu.empty(&shape.kv_dims(), DType::F32)?,
            dv: gpu.empty(&shape.kv_dims(), DType::F32)?,
        };
        att.forward_into(gpu, &q, &k, &v, &out)?;
        let bwd = |enc: &mut wgpu::CommandEncoder| {
            att.encode_backward(gpu, enc, &q, &k, &v, &out.o, &out.lse, &d_o, &rowd, &grads)
        };
        let t = gpu.time(Reps::Target(target_s), bwd)?;
        r.bwd_s = Some(t.seconds);
        r.bwd_tflops = Some(shape.backward_flops(opts.causal) / t.seconds * 1e-12);
    }
    Ok(r)
}

impl FullBench {
    pub fn to_json(&self) -> serde_json::Value {
        let s = &self.shape;
        serde_json::json!({
            "kernel": "full",
            "variant": self.variants.name(),
            "batch": s.batch, "heads_q": s.heads_q, "heads_kv": s.heads_kv,
            "seq_q": s.seq_q, "seq_k": s.seq_k, "head_dim": s.head_dim,
            "causal": self.causal,
            "fwd_ms": self.fwd_s * 1e3,
            "fwd_tflops": self.fwd_tflops,
            "fwd_gbps": self.fwd_gbps,
            "bwd_ms": self.bwd_s.map(|x| x * 1e3),
            "bwd_tflops": self.bwd_tflops,
            "reps": self.reps,
            "timer": format!("{:?}", self.timer),
        })
    }
}
