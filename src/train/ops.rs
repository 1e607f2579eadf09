//! Our kernels as differentiable Burn operations.
//!
//! `AttnBackend` is a Burn backend extension: its `CubeBackend` implementation runs our WGSL
//! kernels on the buffers of Burn's own tensors (see `bridge`), `Fusion` defers them like any
//! other op, and the `Autodiff` implementation (`train::autodiff`) registers our backward kernels
//! as the gradients. Op objects come from the bridge's cache, one per (shape, config).
//! The public functions below validate everything first and return `Result`; inside the
//! backend methods a failure is a bug and panics with its message.
//!
//! Gradients:
//! - full and sparse attention: dQ, dK, dV from our backward kernels (O and LSE kept from the
//!   forward, FlashAttention-2 style recomputation); the block selection is not differentiable
//!   (as in SSA and MoBA, it only decides which keys are attended);
//! - the SSA alignment loss: its kernel writes the loss and both stop-gradient gradients in one
//!   pass; backward scales them by the upstream gradient.

use crate::gpu::{DType, Encoder};
use burn::backend::fusion::custom::TensorSpec;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::wgpu::{CubeBackend, CubeTensor};
use burn::backend::{Backend, Dispatch, backend_extension};
use burn::tensor::{DType as BurnDType, Int, Shape, Tensor as BTensor};

use crate::error::{Result, invalid};
use crate::ops::align::AlignOut;
use crate::ops::attention::{AttnGrads, AttnOutput};
use crate::ops::metrics::MetricsOut;
use crate::ops::select::{SelectInputs, SelectScratch};
use crate::problem::{AttnOptions, AttnShape, SelectOptions, SparseOptions};
use crate::train::bridge::{Bound, alloc, bind, dtype_of, flush, shared_for, shared_of};
use crate::train::generate::DecodeCfg;
use crate::{FullConfig, Qkv, SelectConfig, SparseConfig, SparseInputs};

/// Options of full attention, as the backend ops carry them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FullCfg(pub AttnOptions);

/// Options of selection and sparse attention (the selection's block and k define the sparse op).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SparseCfg(pub SelectOptions);

impl SparseCfg {
    fn sparse(&self) -> SparseConfig {
        SparseConfig::for_selection(&self.0)
    }
}

/// Options of the attention metrics (evaluation only): mask, scale, block size, selection width.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MetricsCfg {
    pub options: SparseOptions,
    pub nsel: usize,
}

fn metrics_meta(
    q: &TensorSpec,
    _k: &TensorSpec,
    _s: &TensorSpec,
    _c: &MetricsCfg,
) -> (TensorSpec, TensorSpec) {
    (lse_spec(q), lse_spec(q))
}

/// Per-row f32 values (LSE, metrics) of q's rows, whatever q's storage.
fn lse_spec(q: &TensorSpec) -> TensorSpec {
    TensorSpec::new(
        Shape::new([q.shape[0], q.shape[1], q.shape[2]]),
        BurnDType::F32,
    )
}

fn full_fwd_meta(
    q: &TensorSpec,
    _k: &TensorSpec,
    _v: &TensorSpec,
    _c: &FullCfg,
) -> (TensorSpec, TensorSpec) {
    (q.clone(), lse_spec(q))
}

#[allow(clippy::too_many_arguments)]
fn full_bwd_meta(
    q: &TensorSpec,
    k: &TensorSpec,
    v: &TensorSpec,
    _o: &TensorSpec,
    _l: &TensorSpec,
    _d: &TensorSpec,
    _c: &FullCfg,
) -> (TensorSpec, TensorSpec, TensorSpec) {
    (q.clone(), k.clone(), v.clone())
}

fn select_meta(q: &TensorSpec, k: &TensorSpec, c: &SparseCfg) -> TensorSpec {
    TensorSpec::new(
        Shape::new([q.shape[0], k.shape[1], q.shape[2], c.0.k]),
        BurnDType::U32,
    )
}

fn sparse_fwd_meta(
    q: &TensorSpec,
    _k: &TensorSpec,
    _v: &TensorSpec,
    _s: &TensorSpec,
    _c: &SparseCfg,
) -> (TensorSpec, TensorSpec) {
    (q.clone(), lse_spec(q))
}

#[allow(clippy::too_many_arguments)]
fn sparse_bwd_meta(
    q: &TensorSpec,
    k: &TensorSpec,
    v: &TensorSpec,
    _s: &TensorSpec,
    _o: &TensorSpec,
    _l: &TensorSpec,
    _d: &TensorSpec,
    _c: &SparseCfg,
) -> (TensorSpec, TensorSpec, TensorSpec) {
    (q.clone(), k.clone(), v.clone())
}

fn full_fwd_bias_meta(
    q: &TensorSpec,
    _k: &TensorSpec,
    _v: &TensorSpec,
    _b: &TensorSpec,
    _c: &FullCfg,
) -> (TensorSpec, TensorSpec) {
    (q.clone(), lse_spec(q))
}

#[allow(clippy::too_many_arguments)]
fn full_bwd_bias_meta(
    q: &TensorSpec,
    k: &TensorSpec,
    v: &TensorSpec,
    b: &TensorSpec,
    _o: &TensorSpec,
    _l: &TensorSpec,
    _d: &TensorSpec,
    _c: &FullCfg,
) -> (TensorSpec, TensorSpec, TensorSpec, TensorSpec) {
    (q.clone(), k.clone(), v.clone(), b.clone())
}

fn select_nosa_meta(q: &TensorSpec, k: &TensorSpec, _e: &TensorSpec, c: &SparseCfg) -> TensorSpec {
    select_meta(q, k, c)
}

fn sparse_fwd_bias_meta(
    q: &TensorSpec,
    _k: &TensorSpec,
    _v: &TensorSpec,
    _s: &TensorSpec,
    _b: &TensorSpec,
    _c: &SparseCfg,
) -> (TensorSpec, TensorSpec) {
    (q.clone(), lse_spec(q))
}

#[allow(clippy::too_many_arguments)]
fn sparse_bwd_bias_meta(
    q: &TensorSpec,
    k: &TensorSpec,
    v: &TensorSpec,
    _s: &TensorSpec,
    b: &TensorSpec,
    _o: &TensorSpec,
    _l: &TensorSpec,
    _d: &TensorSpec,
    _c: &SparseCfg,
) -> (TensorSpec, TensorSpec, TensorSpec, TensorSpec) {
    (q.clone(), k.clone(), v.clone(), b.clone())
}

fn align_meta(
    h: &TensorSpec,
    _s: &TensorSpec,
    _beta: &f32,
) -> (TensorSpec, TensorSpec, TensorSpec) {
    (
        TensorSpec::new(Shape::new([1]), h.dtype),
        h.clone(),
        h.clone(),
    )
}

/// Our kernels as backend operations (see the module docs). Use the functions below rather
/// than these methods: they validate the inputs and return errors instead of panicking.
#[backend_extension(Autodiff, Cube, Fusion)]
pub trait AttnBackend: Backend {
    /// Full attention: (O, LSE).
    #[fusion(meta = full_fwd_meta)]
    fn sa_full_fwd(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        cfg: FullCfg,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// Gradients of full attention: (dQ, dK, dV).
    #[fusion(meta = full_bwd_meta)]
    #[allow(clippy::too_many_arguments)]
    fn sa_full_bwd(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        o: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        d_o: FloatTensor<Self>,
        cfg: FullCfg,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);

    /// Full attention with an additive per-key bias `[b, hkv, seq_k]`: (O, LSE).
    #[fusion(meta = full_fwd_bias_meta)]
    fn sa_full_fwd_bias(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        cfg: FullCfg,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// Its gradients: (dQ, dK, dV, d bias).
    #[fusion(meta = full_bwd_bias_meta)]
    #[allow(clippy::too_many_arguments)]
    fn sa_full_bwd_bias(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        o: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        d_o: FloatTensor<Self>,
        cfg: FullCfg,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    );

    /// Block selection: u32 `[b, hkv, seq_q, k]`.
    #[fusion(meta = select_meta)]
    fn sa_select(q: FloatTensor<Self>, k: FloatTensor<Self>, cfg: SparseCfg) -> IntTensor<Self>;

    /// NOSA's selection with the per-token eviction score `[b, hkv, seq_k]`.
    #[fusion(meta = select_nosa_meta)]
    fn sa_select_nosa(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        evict: FloatTensor<Self>,
        cfg: SparseCfg,
    ) -> IntTensor<Self>;

    /// Block-sparse attention with an additive per-key bias: (O, LSE).
    #[fusion(meta = sparse_fwd_bias_meta)]
    fn sa_sparse_fwd_bias(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        sel: IntTensor<Self>,
        bias: FloatTensor<Self>,
        cfg: SparseCfg,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// Its gradients: (dQ, dK, dV, d bias).
    #[fusion(meta = sparse_bwd_bias_meta)]
    #[allow(clippy::too_many_arguments)]
    fn sa_sparse_bwd_bias(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        sel: IntTensor<Self>,
        bias: FloatTensor<Self>,
        o: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        d_o: FloatTensor<Self>,
        cfg: SparseCfg,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    );

    /// Block-sparse attention over a selection: (O, LSE).
    #[fusion(meta = sparse_fwd_meta)]
    fn sa_sparse_fwd(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        sel: IntTensor<Self>,
        cfg: SparseCfg,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// Gradients of block-sparse attention: (dQ, dK, dV).
    #[fusion(meta = sparse_bwd_meta)]
    #[allow(clippy::too_many_arguments)]
    fn sa_sparse_bwd(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        sel: IntTensor<Self>,
        o: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        d_o: FloatTensor<Self>,
        cfg: SparseCfg,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);

    /// Attention metrics of full causal attention against a selection: (kept share of the
    /// attention mass, entropy), both `[b, hq, seq_q]`. Not differentiable.
    #[fusion(meta = metrics_meta)]
    fn sa_metrics(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        sel: IntTensor<Self>,
        cfg: MetricsCfg,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// SSA alignment: (loss `[1]`, dL/dh_full, dL/dh_sparse).
    #[fusion(meta = align_meta)]
    fn sa_align(
        h_full: FloatTensor<Self>,
        h_sparse: FloatTensor<Self>,
        beta: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);

    /// One decoding step of one layer (`train::generate`): the new tokens' k, v `[b, hkv, 1,
    /// d]` go into the layer's cache, which then selects and attends for q `[b, hq, 1, d]`:
    /// O. Stateful (the cache); not differentiable.
    #[fusion(meta = decode_meta)]
    fn sa_decode(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        cfg: DecodeCfg,
    ) -> FloatTensor<Self>;

    /// The same with NOSA's per-key bias of the new tokens `[b, hkv, 1]`.
    #[fusion(meta = decode_bias_meta)]
    fn sa_decode_bias(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        cfg: DecodeCfg,
    ) -> FloatTensor<Self>;
}

fn decode_meta(q: &TensorSpec, _k: &TensorSpec, _v: &TensorSpec, _c: &DecodeCfg) -> TensorSpec {
    q.clone()
}

fn decode_bias_meta(
    q: &TensorSpec,
    _k: &TensorSpec,
    _v: &TensorSpec,
    _b: &TensorSpec,
    _c: &DecodeCfg,
) -> TensorSpec {
    q.clone()
}

fn dims(t: &CubeTensor) -> Vec<usize> {
    t.meta.shape().iter().copied().collect()
}

fn shape4(q: &[usize], k: &[usize]) -> AttnShape {
    AttnShape {
        batch: q[0],
        heads_q: q[1],
        heads_kv: k[1],
        seq_q: q[2],
        seq_k: k[2],
        head_dim: q[3],
    }
}

/// One decoding step of one layer on Burn's buffers (see `train::generate`).
fn decode_step(
    q: CubeTensor,
    k: CubeTensor,
    v: CubeTensor,
    bias: Option<CubeTensor>,
    cfg: DecodeCfg,
) -> CubeTensor {
    let gpu = shared_of(&q).gpu.clone();
    let (bq, q) = bind(&gpu, q);
    let (bk, _k) = bind(&gpu, k);
    let (bv, _v) = bind(&gpu, v);
    let bb = bias.map(|b| bind(&gpu, b).0);
    let (bo, o) = bind(&gpu, alloc(&gpu, &q, &dims(&q), BurnDType::F32));
    // Burn's queued work (this token's q, k, v) goes first: a staged offloaded cache submits
    // part of the step before `submit` below.
    flush(&q);
    let mut enc = gpu.encoder();
    cfg.lock()
        .encode_step(
            &gpu,
            &mut enc,
            &bq.tensor,
            &bk.tensor,
            &bv.tensor,
            bb.as_ref().map(|b| &b.tensor),
            &bo.tensor,
        )
        .unwrap_or_else(|e| panic!("{e}"));
    submit(&gpu, &q, "decoding step", enc);
    o
}

fn submit(gpu: &crate::Gpu, like: &CubeTensor, what: &str, enc: Encoder) {
    flush(like);
    gpu.scoped(what, || gpu.queue().submit([enc.finish()]))
        .unwrap_or_else(|e| panic!("{e}"));
}

/// The op's configuration for q's storage (f32, or f16 with mixed precision).
fn full_config(cfg: &FullCfg, q: &CubeTensor, bias: bool) -> FullConfig {
    FullConfig::new(cfg.0).bias(bias).dtype(dtype_of(q))
}

/// Full attention forward on Burn's buffers, with the per-key bias when given.
fn full_fwd(
    q: CubeTensor,
    k: CubeTensor,
    v: CubeTensor,
    bias: Option<CubeTensor>,
    cfg: FullCfg,
) -> (CubeTensor, CubeTensor) {
    let sh = shared_of(&q);
    let gpu = sh.gpu.clone();
    let s = shape4(&dims(&q), &dims(&k));
    let op = sh
        .full(s, full_config(&cfg, &q, bias.is_some()))
        .unwrap_or_else(|e| panic!("{e}"));
    let (bq, q) = bind(&gpu, q);
    let (bk, _k) = bind(&gpu, k);
    let (bv, _v) = bind(&gpu, v);
    let bb = bias.map(|b| bind(&gpu, b).0);
    let (bo, o) = bind(&gpu, alloc(&gpu, &q, &s.q_dims(), q.dtype));
    let (bl, lse) = bind(&gpu, alloc(&gpu, &q, &s.lse_dims(), BurnDType::F32));
    let mut enc = gpu.encoder();
    op.encode_forward(
        &gpu,
        &mut enc,
        Qkv::new(&bq.tensor, &bk.tensor, &bv.tensor).bias(bb.as_ref().map(|b| &b.tensor)),
        &AttnOutput {
            o: bo.tensor.clone(),
            lse: bl.tensor.clone(),
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    submit(&gpu, &q, "attention forward", enc);
    (o, lse)
}

/// The gradients' buffers of an attention backward: dQ, dK, dV and d bias when there is a bias.
fn alloc_grads(
    gpu: &crate::Gpu,
    like: &CubeTensor,
    s: &AttnShape,
    bias: bool,
) -> (AttnGrads, Vec<CubeTensor>) {
    let mut dims = vec![
        s.q_dims().to_vec(),
        s.kv_dims().to_vec(),
        s.kv_dims().to_vec(),
    ];
    if bias {
        dims.push(crate::ops::attention::bias_dims(s).to_vec());
    }
    // dQ, dK, dV in q's storage; d bias f32.
    let (bound, tensors): (Vec<Bound>, Vec<CubeTensor>) = dims
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let dtype = if i < 3 { like.dtype } else { BurnDType::F32 };
            bind(gpu, alloc(gpu, like, d, dtype))
        })
        .unzip();
    let grads = AttnGrads {
        dq: bound[0].tensor.clone(),
        dk: bound[1].tensor.clone(),
        dv: bound[2].tensor.clone(),
        dbias: bound.get(3).map(|b| b.tensor.clone()),
    };
    (grads, tensors)
}

/// Full attention backward: dQ, dK, dV (and d bias).
#[allow(clippy::too_many_arguments)]
fn full_bwd(
    q: CubeTensor,
    k: CubeTensor,
    v: CubeTensor,
    bias: Option<CubeTensor>,
    o: CubeTensor,
    lse: CubeTensor,
    d_o: CubeTensor,
    cfg: FullCfg,
) -> Vec<CubeTensor> {
    let sh = shared_of(&q);
    let gpu = sh.gpu.clone();
    let s = shape4(&dims(&q), &dims(&k));
    let op = sh
        .full(s, full_config(&cfg, &q, bias.is_some()))
        .unwrap_or_else(|e| panic!("{e}"));
    let (bq, q) = bind(&gpu, q);
    let b: Vec<Bound> = [k, v, o, lse, d_o]
        .into_iter()
        .map(|t| bind(&gpu, t).0)
        .collect();
    let bb = bias.map(|b| bind(&gpu, b).0);
    let (grads, out) = alloc_grads(&gpu, &q, &s, bb.is_some());
    let mut enc = gpu.encoder();
    op.encode_backward(
        &gpu,
        &mut enc,
        Qkv::new(&bq.tensor, &b[0].tensor, &b[1].tensor).bias(bb.as_ref().map(|b| &b.tensor)),
        &AttnOutput {
            o: b[2].tensor.clone(),
            lse: b[3].tensor.clone(),
        },
        &b[4].tensor,
        &grads,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    submit(&gpu, &q, "attention backward", enc);
    out
}

/// Block selection (NOSA's when an eviction score is given).
fn select(q: CubeTensor, k: CubeTensor, evict: Option<CubeTensor>, cfg: SparseCfg) -> CubeTensor {
    let sh = shared_of(&q);
    let gpu = sh.gpu.clone();
    let s = shape4(&dims(&q), &dims(&k));
    let op = sh
        .select(s, SelectConfig::new(cfg.0))
        .unwrap_or_else(|e| panic!("{e}"));
    let (bq, q) = bind(&gpu, q);
    let (bk, _k) = bind(&gpu, k);
    let be = evict.map(|e| bind(&gpu, e).0);
    let np = op.pooled();
    let mut scratch_dims = vec![
        vec![s.batch, s.heads_kv, np, s.head_dim],
        vec![s.batch, s.heads_kv, s.seq_q, np],
    ];
    if be.is_some() {
        scratch_dims.push(vec![s.batch, s.heads_kv, np]);
    }
    let split = op.split_dims().map(|d| {
        let d = d.to_vec();
        bind(&gpu, alloc(&gpu, &q, &d, BurnDType::F32))
    });
    // Kept bound until the submission (the buffers return to Burn's pool when dropped).
    let scratch: Vec<(Bound, CubeTensor)> = scratch_dims
        .iter()
        .map(|d| bind(&gpu, alloc(&gpu, &q, d, BurnDType::F32)))
        .collect();
    let (bs, sel) = bind(&gpu, alloc(&gpu, &q, &op.selection_dims(), BurnDType::U32));
    let sc = SelectScratch {
        block_keys: scratch[0].0.tensor.clone(),
        scores: scratch[1].0.tensor.clone(),
        evict_pooled: scratch.get(2).map(|x| x.0.tensor.clone()),
        partials: split.as_ref().map(|x| x.0.tensor.clone()),
        logits: None,
    };
    let mut enc = gpu.encoder();
    op.encode(
        &gpu,
        &mut enc,
        &SelectInputs::new(&bq.tensor, &bk.tensor).evict(be.as_ref().map(|e| &e.tensor)),
        &sc,
        &bs.tensor,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    submit(&gpu, &q, "block selection", enc);
    sel
}

/// Block-sparse attention forward (with the per-key bias when given).
fn sparse_fwd(
    q: CubeTensor,
    k: CubeTensor,
    v: CubeTensor,
    sel: CubeTensor,
    bias: Option<CubeTensor>,
    cfg: SparseCfg,
) -> (CubeTensor, CubeTensor) {
    let sh = shared_of(&q);
    let gpu = sh.gpu.clone();
    let s = shape4(&dims(&q), &dims(&k));
    let op = sh
        .sparse(s, cfg.sparse().bias(bias.is_some()).dtype(dtype_of(&q)))
        .unwrap_or_else(|e| panic!("{e}"));
    let (bq, q) = bind(&gpu, q);
    let (bk, _k) = bind(&gpu, k);
    let (bv, _v) = bind(&gpu, v);
    let (bs, _s) = bind(&gpu, sel);
    let bb = bias.map(|b| bind(&gpu, b).0);
    let (bo, o) = bind(&gpu, alloc(&gpu, &q, &s.q_dims(), q.dtype));
    let (bl, lse) = bind(&gpu, alloc(&gpu, &q, &s.lse_dims(), BurnDType::F32));
    let out = AttnOutput {
        o: bo.tensor.clone(),
        lse: bl.tensor.clone(),
    };
    let mut enc = gpu.encoder();
    op.encode_forward(
        &gpu,
        &mut enc,
        &SparseInputs::new(&bq.tensor, &bk.tensor, &bv.tensor, &bs.tensor)
            .bias(bb.as_ref().map(|b| &b.tensor)),
        &out,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    submit(&gpu, &q, "sparse attention forward", enc);
    (o, lse)
}

/// Block-sparse attention backward: dQ, dK, dV (and d bias).
#[allow(clippy::too_many_arguments)]
fn sparse_bwd(
    q: CubeTensor,
    k: CubeTensor,
    v: CubeTensor,
    sel: CubeTensor,
    bias: Option<CubeTensor>,
    o: CubeTensor,
    lse: CubeTensor,
    d_o: CubeTensor,
    cfg: SparseCfg,
) -> Vec<CubeTensor> {
    let sh = shared_of(&q);
    let gpu = sh.gpu.clone();
    let s = shape4(&dims(&q), &dims(&k));
    let op = sh
        .sparse(s, cfg.sparse().bias(bias.is_some()).dtype(dtype_of(&q)))
        .unwrap_or_else(|e| panic!("{e}"));
    let (bq, q) = bind(&gpu, q);
    let b: Vec<Bound> = [k, v, sel, o, lse, d_o]
        .into_iter()
        .map(|t| bind(&gpu, t).0)
        .collect();
    let bb = bias.map(|b| bind(&gpu, b).0);
    let (grads, out) = alloc_grads(&gpu, &q, &s, bb.is_some());
    let attn_out = AttnOutput {
        o: b[3].tensor.clone(),
        lse: b[4].tensor.clone(),
    };
    let mut enc = gpu.encoder();
    op.encode_backward(
        &gpu,
        &mut enc,
        &SparseInputs::new(&bq.tensor, &b[0].tensor, &b[1].tensor, &b[2].tensor)
            .bias(bb.as_ref().map(|b| &b.tensor)),
        &attn_out,
        &b[5].tensor,
        &grads,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    submit(&gpu, &q, "sparse attention backward", enc);
    out
}

fn three(mut g: Vec<CubeTensor>) -> (CubeTensor, CubeTensor, CubeTensor) {
    let dv = g.pop().expect("dv");
    let dk = g.pop().expect("dk");
    (g.pop().expect("dq"), dk, dv)
}

fn four(mut g: Vec<CubeTensor>) -> (CubeTensor, CubeTensor, CubeTensor, CubeTensor) {
    let db = g.pop().expect("d bias");
    let (dq, dk, dv) = three(g);
    (dq, dk, dv, db)
}

impl AttnBackend for CubeBackend {
    fn sa_decode(q: CubeTensor, k: CubeTensor, v: CubeTensor, cfg: DecodeCfg) -> CubeTensor {
        decode_step(q, k, v, None, cfg)
    }

    fn sa_decode_bias(
        q: CubeTensor,
        k: CubeTensor,
        v: CubeTensor,
        bias: CubeTensor,
        cfg: DecodeCfg,
    ) -> CubeTensor {
        decode_step(q, k, v, Some(bias), cfg)
    }

    fn sa_full_fwd(
        q: CubeTensor,
        k: CubeTensor,
        v: CubeTensor,
        cfg: FullCfg,
    ) -> (CubeTensor, CubeTensor) {
        full_fwd(q, k, v, None, cfg)
    }

    fn sa_full_fwd_bias(
        q: CubeTensor,
        k: CubeTensor,
        v: CubeTensor,
        bias: CubeTensor,
        cfg: FullCfg,
    ) -> (CubeTensor, CubeTensor) {
        full_fwd(q, k, v, Some(bias), cfg)
    }

    fn sa_full_bwd(
        q: CubeTensor,
        k: CubeTensor,
        v: CubeTensor,
        o: CubeTensor,
        lse: CubeTensor,
        d_o: CubeTensor,
        cfg: FullCfg,
    ) -> (CubeTensor, CubeTensor, CubeTensor) {
        three(full_bwd(q, k, v, None, o, lse, d_o, cfg))
    }

    fn sa_full_bwd_bias(
        q: CubeTensor,
        k: CubeTensor,
        v: CubeTensor,
        bias: CubeTensor,
        o: CubeTensor,
        lse: CubeTensor,
        d_o: CubeTensor,
        cfg: FullCfg,
    ) -> (CubeTensor, CubeTensor, CubeTensor, CubeTensor) {
        four(full_bwd(q, k, v, Some(bias), o, lse, d_o, cfg))
    }

    fn sa_select(q: CubeTensor, k: CubeTensor, cfg: SparseCfg) -> CubeTensor {
        select(q, k, None, cfg)
    }

    fn sa_select_nosa(
        q: CubeTensor,
        k: CubeTensor,
        evict: CubeTensor,
        cfg: SparseCfg,
    ) -> CubeTensor {
        select(q, k, Some(evict), cfg)
    }

    fn sa_sparse_fwd(
        q: CubeTensor,
        k: CubeTensor,
        v: CubeTensor,
        sel: CubeTensor,
        cfg: SparseCfg,
    ) -> (CubeTensor, CubeTensor) {
        sparse_fwd(q, k, v, sel, None, cfg)
    }

    fn sa_sparse_fwd_bias(
        q: CubeTensor,
        k: CubeTensor,
        v: CubeTensor,
        sel: CubeTensor,
        bias: CubeTensor,
        cfg: SparseCfg,
    ) -> (CubeTensor, CubeTensor) {
        sparse_fwd(q, k, v, sel, Some(bias), cfg)
    }

    fn sa_sparse_bwd(
        q: CubeTensor,
        k: CubeTensor,
        v: CubeTensor,
        sel: CubeTensor,
        o: CubeTensor,
        lse: CubeTensor,
        d_o: CubeTensor,
        cfg: SparseCfg,
    ) -> (CubeTensor, CubeTensor, CubeTensor) {
        three(sparse_bwd(q, k, v, sel, None, o, lse, d_o, cfg))
    }

    fn sa_sparse_bwd_bias(
        q: CubeTensor,
        k: CubeTensor,
        v: CubeTensor,
        sel: CubeTensor,
        bias: CubeTensor,
        o: CubeTensor,
        lse: CubeTensor,
        d_o: CubeTensor,
        cfg: SparseCfg,
    ) -> (CubeTensor, CubeTensor, CubeTensor, CubeTensor) {
        four(sparse_bwd(q, k, v, sel, Some(bias), o, lse, d_o, cfg))
    }

    fn sa_metrics(
        q: CubeTensor,
        k: CubeTensor,
        sel: CubeTensor,
        cfg: MetricsCfg,
    ) -> (CubeTensor, CubeTensor) {
        let sh = shared_of(&q);
        let gpu = sh.gpu.clone();
        let s = shape4(&dims(&q), &dims(&k));
        let op = sh
            .metrics(s, cfg.options, cfg.nsel)
            .unwrap_or_else(|e| panic!("{e}"));
        let (bq, q) = bind(&gpu, q);
        let (bk, _k) = bind(&gpu, k);
        let (bs, _s) = bind(&gpu, sel);
        let mass = [s.batch, s.heads_q, s.seq_q, op.blocks()];
        let (bm, _m) = bind(&gpu, alloc(&gpu, &q, &mass, BurnDType::F32));
        let (bsp, sparsity) = bind(&gpu, alloc(&gpu, &q, &s.lse_dims(), BurnDType::F32));
        let (ben, entropy) = bind(&gpu, alloc(&gpu, &q, &s.lse_dims(), BurnDType::F32));
        let out = MetricsOut {
            block_mass: bm.tensor.clone(),
            sparsity: bsp.tensor.clone(),
            entropy: ben.tensor.clone(),
        };
        let mut enc = gpu.encoder();
        op.encode(&gpu, &mut enc, &bq.tensor, &bk.tensor, &bs.tensor, &out)
            .unwrap_or_else(|e| panic!("{e}"));
        submit(&gpu, &q, "attention metrics", enc);
        (sparsity, entropy)
    }

    fn sa_align(
        h_full: CubeTensor,
        h_sparse: CubeTensor,
        beta: f32,
    ) -> (CubeTensor, CubeTensor, CubeTensor) {
        let sh = shared_of(&h_full);
        let gpu = sh.gpu.clone();
        let d = dims(&h_full);
        let op = sh.align(&d, beta).unwrap_or_else(|e| panic!("{e}"));
        let (bf, hf) = bind(&gpu, h_full);
        let (bs, _hs) = bind(&gpu, h_sparse);
        let (bl, loss) = bind(&gpu, alloc(&gpu, &hf, &[1], BurnDType::F32));
        let (bgf, gf) = bind(&gpu, alloc(&gpu, &hf, &d, BurnDType::F32));
        let (bgs, gs) = bind(&gpu, alloc(&gpu, &hf, &d, BurnDType::F32));
        let out = AlignOut {
            loss: bl.tensor.clone(),
            g_full: bgf.tensor.clone(),
            g_sparse: bgs.tensor.clone(),
        };
        let mut enc = gpu.encoder();
        op.encode(&gpu, &mut enc, &bf.tensor, &bs.tensor, 1.0, &out)
            .unwrap_or_else(|e| panic!("{e}"));
        submit(&gpu, &hf, "alignment loss", enc);
        (loss, gf, gs)
    }
}

// ---- Public, validated API on Burn tensors -------------------------------------------------

fn check_f32<const D: usize>(name: &str, t: &BTensor<D>) -> Result<()> {
    if t.dtype() != BurnDType::F32 {
        invalid!("{name} must be f32, got {:?}", t.dtype());
    }
    Ok(())
}

fn attn_shape(q: &BTensor<4>, k: &BTensor<4>, v: &BTensor<4>) -> Result<AttnShape> {
    let s = qkv_shape(q, k, v)?;
    for (n, t) in [("q", q), ("k", k), ("v", v)] {
        check_f32(n, t)?;
    }
    Ok(s)
}

/// Attention's shape and storage (full and sparse): q, k and v all f32, or all f16 (mixed
/// precision).
fn qkv_storage(q: &BTensor<4>, k: &BTensor<4>, v: &BTensor<4>) -> Result<(AttnShape, DType)> {
    let s = qkv_shape(q, k, v)?;
    let dtype = match (q.dtype(), k.dtype(), v.dtype()) {
        (BurnDType::F32, BurnDType::F32, BurnDType::F32) => DType::F32,
        (BurnDType::F16, BurnDType::F16, BurnDType::F16) => DType::F16,
        (a, b, c) => invalid!("q, k and v must be all f32 or all f16, got {a:?}, {b:?}, {c:?}"),
    };
    Ok((s, dtype))
}

fn qkv_shape(q: &BTensor<4>, k: &BTensor<4>, v: &BTensor<4>) -> Result<AttnShape> {
    let (qd, kd, vd) = (q.dims(), k.dims(), v.dims());
    if kd != vd {
        invalid!("k {kd:?} and v {vd:?} must have the same shape");
    }
    if qd[0] != kd[0] || qd[3] != kd[3] {
        invalid!("q {qd:?} and k {kd:?} disagree on batch or head_dim");
    }
    if q.device() != k.device() || q.device() != v.device() {
        invalid!("q, k and v must live on one device");
    }
    Ok(shape4(&qd, &kd))
}

/// Full attention `softmax(q kᵀ · scale) v` on `[batch, heads, seq, head_dim]` tensors (GQA
/// when k and v have fewer heads), differentiable in q, k and v. Returns O (in q's storage: f32,
/// or f16, where the device's f16 kernels run, on tensor cores where it has them) and the row
/// LSE (f32).
pub fn attention(
    q: BTensor<4>,
    k: BTensor<4>,
    v: BTensor<4>,
    opts: AttnOptions,
) -> Result<(BTensor<4>, BTensor<3>)> {
    let (s, dtype) = qkv_storage(&q, &k, &v)?;
    shared_for(&q.device())?.full(s, FullConfig::new(opts).dtype(dtype))?;
    let (o, lse) = <Dispatch as AttnBackend>::sa_full_fwd(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        FullCfg(opts),
    );
    Ok((BTensor::from_dispatch(o), BTensor::from_dispatch(lse)))
}

/// The bias `[batch, kv_heads, seq_k]` of an attention over q, k of shape `s`, checked.
fn check_bias(name: &str, s: &AttnShape, bias: &BTensor<3>, like: &BTensor<4>) -> Result<()> {
    let want = crate::ops::attention::bias_dims(s);
    if bias.dims() != want {
        invalid!(
            "the {name} has shape {:?}; q and k need [batch, kv_heads, seq_k] = {want:?}",
            bias.dims()
        );
    }
    check_f32(name, bias)?;
    if bias.device() != like.device() {
        invalid!("the {name} must live on the device of q, k and v");
    }
    Ok(())
}

/// [`attention`] with an optional additive per-key bias `[batch, kv_heads, seq_k]` on the
/// logits (NOSA's eviction head: logit = scale·q·k + bias), differentiable in the bias too.
pub fn attention_with_bias(
    q: BTensor<4>,
    k: BTensor<4>,
    v: BTensor<4>,
    bias: Option<BTensor<3>>,
    opts: AttnOptions,
) -> Result<(BTensor<4>, BTensor<3>)> {
    let Some(bias) = bias else {
        return attention(q, k, v, opts);
    };
    let (s, dtype) = qkv_storage(&q, &k, &v)?;
    check_bias("bias", &s, &bias, &q)?;
    shared_for(&q.device())?.full(s, FullConfig::new(opts).bias(true).dtype(dtype))?;
    let (o, lse) = <Dispatch as AttnBackend>::sa_full_fwd_bias(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        bias.into_dispatch(),
        FullCfg(opts),
    );
    Ok((BTensor::from_dispatch(o), BTensor::from_dispatch(lse)))
}

/// NOSA's selection (`opts.evict` > 0): the query-aware blocks, then the rest by the per-token
/// eviction score `[batch, kv_heads, seq_k]` pooled like the keys. Not differentiable.
pub fn select_blocks_nosa(
    q: BTensor<4>,
    k: BTensor<4>,
    evict: BTensor<3>,
    opts: &SelectOptions,
) -> Result<BTensor<4, Int>> {
    let s = attn_shape(&q, &k, &k)?;
    check_bias("eviction score", &s, &evict, &q)?;
    shared_for(&q.device())?.select(s, SelectConfig::new(*opts))?;
    if opts.evict == 0 {
        invalid!("select_blocks_nosa needs options with evict > 0 (NOSA's budget)");
    }
    let sel = <Dispatch as AttnBackend>::sa_select_nosa(
        q.detach().into_dispatch(),
        k.detach().into_dispatch(),
        evict.detach().into_dispatch(),
        SparseCfg(*opts),
    );
    Ok(BTensor::from_dispatch(sel))
}

/// The selection `opts` asks for: NOSA's, ranked by the eviction score `evict`, when
/// `opts.evict > 0` (all zeros where the model has no eviction head: the head as training
/// starts it), else the query's alone. One rule for the forward, the metrics and the sweeps.
pub fn select_for(
    q: BTensor<4>,
    k: BTensor<4>,
    evict: Option<BTensor<3>>,
    opts: &SelectOptions,
) -> Result<BTensor<4, Int>> {
    if opts.evict == 0 {
        return select_blocks(q, k, opts);
    }
    let evict = evict.unwrap_or_else(|| {
        let [b, hkv, seq, _] = k.dims();
        BTensor::zeros([b, hkv, seq], &k.device())
    });
    select_blocks_nosa(q, k, evict, opts)
}

/// Blocks each (token, kv head) attends: u32 `[batch, heads_kv, seq_q, opts.k]`, ascending,
/// padded with `u32::MAX` (see `reference::select`). Not differentiable.
pub fn select_blocks(
    q: BTensor<4>,
    k: BTensor<4>,
    opts: &SelectOptions,
) -> Result<BTensor<4, Int>> {
    let s = attn_shape(&q, &k, &k)?;
    shared_for(&q.device())?.select(s, SelectConfig::new(*opts))?;
    let sel = <Dispatch as AttnBackend>::sa_select(
        q.detach().into_dispatch(),
        k.detach().into_dispatch(),
        SparseCfg(*opts),
    );
    Ok(BTensor::from_dispatch(sel))
}

/// A selection tensor of the shape `want` with 32-bit indices.
fn check_selection(sel: &BTensor<4, Int>, want: &[usize; 4]) -> Result<()> {
    if sel.dims() != *want {
        invalid!(
            "the selection has shape {:?}; these inputs and options need {want:?}",
            sel.dims()
        );
    }
    if !matches!(sel.dtype(), BurnDType::U32 | BurnDType::I32) {
        invalid!(
            "the selection must hold 32-bit indices, got {:?}",
            sel.dtype()
        );
    }
    Ok(())
}

/// Block-sparse attention over a selection from [`select_blocks`] made with the same `opts`;
/// differentiable in q, k and v. Returns O and the row LSE.
pub fn sparse_attention(
    q: BTensor<4>,
    k: BTensor<4>,
    v: BTensor<4>,
    sel: BTensor<4, Int>,
    opts: &SelectOptions,
) -> Result<(BTensor<4>, BTensor<3>)> {
    let (s, dtype) = qkv_storage(&q, &k, &v)?;
    let cfg = SparseCfg(*opts);
    let op = shared_for(&q.device())?.sparse(s, cfg.sparse().dtype(dtype))?;
    check_selection(&sel, &op.selection_dims())?;
    let (o, lse) = <Dispatch as AttnBackend>::sa_sparse_fwd(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        sel.into_dispatch(),
        cfg,
    );
    Ok((BTensor::from_dispatch(o), BTensor::from_dispatch(lse)))
}

/// [`sparse_attention`] with an optional additive per-key bias `[batch, kv_heads, seq_k]`,
/// differentiable in the bias too (NOSA).
pub fn sparse_attention_with_bias(
    q: BTensor<4>,
    k: BTensor<4>,
    v: BTensor<4>,
    sel: BTensor<4, Int>,
    bias: Option<BTensor<3>>,
    opts: &SelectOptions,
) -> Result<(BTensor<4>, BTensor<3>)> {
    let Some(bias) = bias else {
        return sparse_attention(q, k, v, sel, opts);
    };
    let (s, dtype) = qkv_storage(&q, &k, &v)?;
    check_bias("bias", &s, &bias, &q)?;
    let cfg = SparseCfg(*opts);
    let op = shared_for(&q.device())?.sparse(s, cfg.sparse().bias(true).dtype(dtype))?;
    check_selection(&sel, &op.selection_dims())?;
    let (o, lse) = <Dispatch as AttnBackend>::sa_sparse_fwd_bias(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        sel.into_dispatch(),
        bias.into_dispatch(),
        cfg,
    );
    Ok((BTensor::from_dispatch(o), BTensor::from_dispatch(lse)))
}

/// Per-row attention metrics of full causal attention over q, k against a selection made with
/// `opts` ([`select_blocks`]): the share of the attention mass inside the selected blocks and
/// the entropy (nats), both `[batch, heads_q, seq_q]`. Computed on Burn's buffers in place.
pub fn attention_metrics(
    q: BTensor<4>,
    k: BTensor<4>,
    sel: BTensor<4, Int>,
    opts: &SelectOptions,
) -> Result<(BTensor<3>, BTensor<3>)> {
    let s = attn_shape(&q, &k, &k)?;
    shared_for(&q.device())?.metrics(s, opts.sparse(), opts.k)?;
    check_selection(&sel, &[s.batch, s.heads_kv, s.seq_q, opts.k])?;
    let (sp, en) = <Dispatch as AttnBackend>::sa_metrics(
        q.detach().into_dispatch(),
        k.detach().into_dispatch(),
        sel.into_dispatch(),
        MetricsCfg {
            options: opts.sparse(),
            nsel: opts.k,
        },
    );
    Ok((BTensor::from_dispatch(sp), BTensor::from_dispatch(en)))
}

/// SSA's alignment loss `SmoothL1(h_full, sg(h_sparse)) + SmoothL1(h_sparse, sg(h_full))`
/// (means over elements, threshold `beta`), a one-element tensor differentiable in both inputs.
pub fn align_loss<const D: usize>(
    h_full: BTensor<D>,
    h_sparse: BTensor<D>,
    beta: f32,
) -> Result<BTensor<1>> {
    check_f32("h_full", &h_full)?;
    check_f32("h_sparse", &h_sparse)?;
    if h_full.dims() != h_sparse.dims() {
        invalid!(
            "h_full {:?} and h_sparse {:?} must have the same shape",
            h_full.dims(),
            h_sparse.dims()
        );
    }
    shared_for(&h_full.device())?.align(&h_full.dims(), beta)?;
    let (loss, _, _) =
        <Dispatch as AttnBackend>::sa_align(h_full.into_dispatch(), h_sparse.into_dispatch(), beta);
    Ok(BTensor::from_dispatch(loss))
}
