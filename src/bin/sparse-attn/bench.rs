//! Benchmark drivers shared by the CLI: time kernels on real shapes and report throughput.

use sparse_attn::error::Result;
use sparse_attn::gpu::Encoder;
use sparse_attn::gpu::{DType, Gpu, Reps, Storage, Tensor, TimerSource};
use sparse_attn::ops::attention::{AttnGrads, AttnOutput, FullAttention, Variants};
use sparse_attn::ops::select::{BlockSelect, SelectInputs};
use sparse_attn::ops::sparse::{SparseAttention, SparseKernel};
use sparse_attn::problem::SelectOptions;
use sparse_attn::problem::{AttnOptions, AttnShape};
use sparse_attn::{FullConfig, SelectConfig, SparseConfig};
use sparse_attn::{Qkv, SparseInputs};

/// One measured configuration.
#[derive(Clone, Debug)]
pub struct FullBench {
    pub shape: AttnShape,
    pub causal: bool,
    pub variants: Variants,
    pub storage: Storage,
    pub fwd_s: f64,
    pub fwd_tflops: f64,
    /// Compulsory traffic of the forward pass (read q, k, v; write O, LSE) per second.
    pub fwd_gbps: f64,
    pub bwd_s: Option<f64>,
    pub bwd_tflops: Option<f64>,
    pub reps: u32,
    pub timer: TimerSource,
}

/// q, k, v and dO made on the GPU: host generation and upload of GBs would dominate a sweep.
/// Uniform in [-sqrt(3), sqrt(3)) has unit variance, like the tests' normal inputs.
fn random_inputs(gpu: &Gpu, shape: &AttnShape, dtype: DType) -> Result<[Tensor; 4]> {
    let s3 = 3f32.sqrt();
    Ok([
        gpu.random_uniform_as(&shape.q_dims(), 1, s3, dtype)?,
        gpu.random_uniform_as(&shape.kv_dims(), 2, s3, dtype)?,
        gpu.random_uniform_as(&shape.kv_dims(), 3, s3, dtype)?,
        gpu.random_uniform_as(&shape.q_dims(), 4, s3, dtype)?,
    ])
}

/// Time forward (and backward) full attention for one shape and variant.
pub fn bench_full(
    gpu: &Gpu,
    shape: AttnShape,
    opts: AttnOptions,
    variants: Variants,
    storage: Storage,
    backward: bool,
    target_s: f64,
) -> Result<FullBench> {
    let att = FullAttention::new(
        gpu,
        shape,
        &FullConfig::new(opts).storage(storage).variants(variants),
    )?;
    let dt = storage.dtype();
    let [q, k, v, d_o] = random_inputs(gpu, &shape, dt)?;
    let out = AttnOutput::empty_as(gpu, &shape, dt)?;
    let fwd = |enc: &mut Encoder| att.encode_forward(gpu, enc, Qkv::new(&q, &k, &v), &out);
    let t = gpu.time(Reps::Target(target_s), fwd)?;
    let flops = shape.forward_flops(opts.causal);
    let e = dt.size() as f64;
    let bytes = e * (2 * shape.q_len() + 2 * shape.kv_len()) as f64 + 4.0 * shape.lse_len() as f64;
    let mut r = FullBench {
        shape,
        causal: opts.causal,
        variants,
        storage,
        fwd_s: t.seconds,
        fwd_tflops: flops / t.seconds * 1e-12,
        fwd_gbps: bytes / t.seconds * 1e-9,
        bwd_s: None,
        bwd_tflops: None,
        reps: t.reps,
        timer: t.source,
    };
    if backward {
        let grads = AttnGrads::empty_as(gpu, &shape, dt)?;
        att.forward_into(gpu, &q, &k, &v, &out)?;
        let bwd = |enc: &mut Encoder| {
            att.encode_backward(gpu, enc, Qkv::new(&q, &k, &v), &out, &d_o, &grads)
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
            "storage": self.storage.name(),
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

/// One measured block-sparse configuration: selection, sparse forward, and the dense causal
/// forward on the same inputs (the baseline of the same run).
#[derive(Clone, Debug)]
pub struct SparseBench {
    pub shape: AttnShape,
    pub select: SelectOptions,
    pub select_s: f64,
    pub sparse_fwd_s: f64,
    pub dense_fwd_s: f64,
    pub sparse_bwd_s: Option<f64>,
    pub dense_bwd_s: Option<f64>,
    /// Dense causal FLOPs over (selection + sparse forward) time.
    pub dense_equiv_tflops: f64,
    /// FLOPs of the pairs the sparse forward attends to, over its own time.
    pub sparse_tflops: f64,
    pub timer: TimerSource,
    /// Per kernel (`file:entry`, seconds, dispatches) of selection, sparse forward and sparse
    /// backward, when asked for (`Gpu::profile`).
    pub stages: Vec<(String, f64, u32)>,
    /// Storage of q, k, v, O and the gradients (accumulation is f32; with f16 the dense baseline
    /// runs on tensor cores where the device has them, the sparse forward where asked).
    pub dtype: DType,
    /// The sparse forward kernel that ran (`portable` or `coop`).
    pub forward: &'static str,
    /// The sparse backward kernels that ran (`portable` or `coop`).
    pub backward: &'static str,
    /// The selection's top-k kernel that ran (`sort` or `subgroup`).
    pub topk: &'static str,
    /// The selection's block-score kernel that ran (`tiled` or `coop`).
    pub scores: &'static str,
    /// The sparse attention had a per-key bias (NOSA).
    pub bias: bool,
}

/// (query, key) pairs a causal sparse forward attends to when every token keeps `k` blocks of
/// `block` keys including its own (the selector's forced current block).
pub fn sparse_pairs(shape: &AttnShape, block: usize, k: usize) -> u64 {
    let off = shape.q_offset();
    let per_head: u64 = (0..shape.seq_q)
        .map(|t| {
            let p = off + t;
            if p / block < k {
                (p + 1) as u64
            } else {
                ((k - 1) * block + p % block + 1) as u64
            }
        })
        .sum();
    per_head * (shape.batch * shape.heads_q) as u64
}

/// What `bench_sparse` times: the selection (options, dtype, top-k kernel), the sparse kernels,
/// and how.
#[derive(Clone, Copy, Debug)]
pub struct SparseRun {
    pub select: SelectConfig,
    pub forward: SparseKernel,
    pub backward: SparseKernel,
    /// Also time the backward passes.
    pub with_backward: bool,
    pub reps: Reps,
    /// Also time every kernel on its own (`Gpu::profile`).
    pub stages: bool,
    /// Sparse attention with a random per-key bias (NOSA), forward and backward.
    pub bias: bool,
}

impl SparseRun {
    /// f32, the library's kernels, forward and backward, one repetition.
    pub fn new(select: SelectOptions) -> Self {
        Self {
            select: SelectConfig::new(select),
            forward: SparseKernel::Auto,
            backward: SparseKernel::Auto,
            with_backward: true,
            reps: Reps::Fixed(1),
            stages: false,
            bias: false,
        }
    }
}

/// Time block selection, the sparse forward over its selection, and the dense causal forward.
pub fn bench_sparse(gpu: &Gpu, shape: AttnShape, run: &SparseRun) -> Result<SparseBench> {
    let SparseRun {
        select:
            SelectConfig {
                options: select,
                dtype,
                ..
            },
        forward,
        backward: backward_kernel,
        with_backward: backward,
        reps,
        stages,
        bias,
    } = *run;
    let [q, k, v, d_o] = random_inputs(gpu, &shape, dtype)?;
    // NOSA: a random eviction score for the selection, and the same values as the bias.
    let key_scores = if select.evict > 0 || bias {
        let n = shape.batch * shape.heads_kv * shape.seq_k;
        let mut rng = sparse_attn::reference::Rng::new(17);
        Some(gpu.upload(
            &[shape.batch, shape.heads_kv, shape.seq_k],
            &rng.normal_vec(n, 1.0),
        )?)
    } else {
        None
    };
    let evict = key_scores.as_ref().filter(|_| select.evict > 0);
    let bias_t = key_scores.as_ref().filter(|_| bias);
    let sel_in = SelectInputs::new(&q, &k).evict(evict);
    let selector = BlockSelect::new(gpu, shape, &run.select)?;
    let scratch = selector.scratch(gpu)?;
    let sel = gpu.empty(&selector.selection_dims(), DType::U32)?;
    let t_sel = gpu.time(reps, |enc| {
        selector.encode(gpu, enc, &sel_in, &scratch, &sel)
    })?;
    let sparse = SparseAttention::new(
        gpu,
        shape,
        &SparseConfig::for_selection(&select)
            .dtype(dtype)
            .bias(bias)
            .kernels(forward, backward_kernel),
    )?;
    let sp_in = SparseInputs::new(&q, &k, &v, &sel).bias(bias_t);
    let out = AttnOutput::empty_as(gpu, &shape, dtype)?;
    let t_sp = gpu.time(reps, |enc| sparse.encode_forward(gpu, enc, &sp_in, &out))?;
    let dense = FullAttention::new(
        gpu,
        shape,
        &FullConfig::new(AttnOptions::causal(select.causal)).dtype(dtype),
    )?;
    let t_dense = gpu.time(reps, |enc| {
        dense.encode_forward(gpu, enc, Qkv::new(&q, &k, &v), &out)
    })?;
    let (mut sparse_bwd_s, mut dense_bwd_s) = (None, None);
    let mut profile = Vec::new();
    if stages {
        profile.extend(gpu.profile(3, |enc| selector.encode(gpu, enc, &sel_in, &scratch, &sel))?);
        profile.extend(gpu.profile(3, |enc| sparse.encode_forward(gpu, enc, &sp_in, &out))?);
    }
    if backward {
        let sp_grads = AttnGrads::empty_with(gpu, &shape, dtype, bias)?;
        let sp_out = sparse.forward(gpu, &sp_in)?;
        let bwd =
            |enc: &mut Encoder| sparse.encode_backward(gpu, enc, &sp_in, &sp_out, &d_o, &sp_grads);
        let grads = AttnGrads::empty_as(gpu, &shape, dtype)?;
        let t = gpu.time(reps, bwd)?;
        if stages {
            profile.extend(gpu.profile(3, bwd)?);
        }
        sparse_bwd_s = Some(t.seconds);
        let dense_out = dense.forward(gpu, &q, &k, &v)?;
        let t = gpu.time(reps, |enc| {
            dense.encode_backward(gpu, enc, Qkv::new(&q, &k, &v), &dense_out, &d_o, &grads)
        })?;
        dense_bwd_s = Some(t.seconds);
    }
    let pairs = sparse_pairs(&shape, select.block, select.k) as f64;
    Ok(SparseBench {
        sparse_bwd_s,
        dense_bwd_s,
        shape,
        select,
        select_s: t_sel.seconds,
        sparse_fwd_s: t_sp.seconds,
        dense_fwd_s: t_dense.seconds,
        dense_equiv_tflops: shape.forward_flops(select.causal) / (t_sel.seconds + t_sp.seconds)
            * 1e-12,
        sparse_tflops: 4.0 * shape.head_dim as f64 * pairs / t_sp.seconds * 1e-12,
        timer: t_sp.source,
        stages: profile,
        dtype,
        forward: sparse.forward_kernel().name(),
        backward: sparse.backward_kernel().name(),
        topk: selector.topk_kernel().name(),
        scores: selector.score_kernel().name(),
        bias,
    })
}

impl SparseBench {
    /// Dense forward time over selection + sparse forward time.
    pub fn speedup(&self) -> f64 {
        self.dense_fwd_s / (self.select_s + self.sparse_fwd_s)
    }

    pub fn to_json(&self) -> serde_json::Value {
        let s = &self.shape;
        serde_json::json!({
            "kernel": "sparse",
            "dtype": format!("{:?}", self.dtype),
            "forward": self.forward,
            "backward": self.backward,
            "topk": self.topk,
            "scores": self.scores,
            "batch": s.batch, "heads_q": s.heads_q, "heads_kv": s.heads_kv,
            "seq_q": s.seq_q, "seq_k": s.seq_k, "head_dim": s.head_dim,
            "causal": self.select.causal,
            "block": self.select.block, "k": self.select.k,
            "n_init": self.select.n_init, "n_local": self.select.n_local,
            "evict": self.select.evict, "bias": self.bias,
            "scoring": format!("{:?}", self.select.scoring),
            "select_ms": self.select_s * 1e3,
            "sparse_fwd_ms": self.sparse_fwd_s * 1e3,
            "dense_fwd_ms": self.dense_fwd_s * 1e3,
            "sparse_bwd_ms": self.sparse_bwd_s.map(|x| x * 1e3),
            "dense_bwd_ms": self.dense_bwd_s.map(|x| x * 1e3),
            "speedup_bwd": self.dense_bwd_s.zip(self.sparse_bwd_s).map(|(d, s)| d / s),
            "speedup_fwd_incl_select": self.speedup(),
            "select_share": self.select_s / (self.select_s + self.sparse_fwd_s),
            "dense_equiv_tflops": self.dense_equiv_tflops,
            "sparse_tflops": self.sparse_tflops,
            "timer": format!("{:?}", self.timer),
            "stages": self.stages.iter().map(|(k, s, n)| serde_json::json!({
                "kernel": k, "ms": s * 1e3, "dispatches": n,
            })).collect::<Vec<_>>(),
        })
    }
}
