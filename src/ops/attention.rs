//! Tiled full attention on the GPU: forward (O, LSE) and backward (dQ, dK, dV).
//!
//! Owns the pipelines (`shaders/attention_fwd.wgsl`, `shaders/attention_bwd.wgsl`), their tile
//! configurations, the bind layouts and the dispatch math. The kernels run without naga's runtime
//! bounds checks, so everything an index depends on is validated here first.

use crate::gpu::Encoder;
use std::sync::Arc;

use crate::error::{Error, Result, invalid};
use crate::gpu::{DType, Gpu, Pipeline, PipelineKey, Storage, Tensor};
use crate::ops::launch::{
    self, Chunk, Params, Window, check_args, input, output, plan_units, window_sized,
};
use crate::ops::rowdot::RowDot;
use crate::ops::tiles::{Kind, THREAD_ROWS, Tiles};
use crate::problem::{AttnOptions, AttnShape};

/// Kernel variants of the portable f32 family. Every variant computes the same thing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Variant {
    /// Fits WebGPU's default limits (16 KiB workgroup storage, 256 invocations): runs in every
    /// browser and on every adapter.
    Portable,
    /// Larger tiles for adapters with at least 32 KiB of workgroup storage (lavapipe, Apple).
    Large,
    /// The largest tiles, for adapters with 48 KiB of workgroup storage (NVIDIA, AMD desktop).
    Xl,
    /// Tensor cores through cooperative matrices (`ops::coop`): f16 tensors only, forward only
    /// so far; needs EXPERIMENTAL_COOPERATIVE_MATRIX, SHADER_F16, SUBGROUP and 32-lane subgroups.
    Coop,
}

impl Variant {
    /// The portable-arithmetic (f32 FMA) variants, which every storage runs.
    pub const ALL: [Variant; 3] = [Variant::Portable, Variant::Large, Variant::Xl];

    pub fn name(self) -> &'static str {
        match self {
            Variant::Portable => "f32-portable",
            Variant::Large => "f32-large",
            Variant::Xl => "f32-xl",
            Variant::Coop => "coop",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "portable" | "f32-portable" => Ok(Variant::Portable),
            "large" | "f32-large" => Ok(Variant::Large),
            "xl" | "f32-xl" => Ok(Variant::Xl),
            "coop" => Ok(Variant::Coop),
            _ => invalid!("unknown kernel variant `{s}` (known: portable, large, xl, coop)"),
        }
    }
}

/// The variant of each pass: forward and backward may differ (what is fastest differs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Variants {
    pub forward: Variant,
    pub backward: Variant,
}

impl Variants {
    pub fn uniform(v: Variant) -> Self {
        Self {
            forward: v,
            backward: v,
        }
    }

    pub fn name(&self) -> String {
        if self.forward == self.backward {
            self.forward.name().to_string()
        } else {
            format!("fwd {} + bwd {}", self.forward.name(), self.backward.name())
        }
    }
}

fn check_fits(gpu: &Gpu, variant: Variant, d: usize, kinds: &[Kind]) -> Result<()> {
    crate::problem::check_head_dim(d)?;
    if variant == Variant::Coop {
        // As a backward variant: dQ and dK/dV on tensor cores (attention_coop_bwd.wgsl).
        return crate::ops::coop::supported(gpu, d);
    }
    let l = gpu.limits();
    let threads = Tiles::tc(d as u32) * THREAD_ROWS;
    if l.max_compute_invocations_per_workgroup < threads || l.max_compute_workgroup_size_x < threads
    {
        return Err(Error::Unsupported(format!(
            "the attention kernels use {threads} invocations per workgroup; this device allows {}",
            l.max_compute_invocations_per_workgroup
        )));
    }
    let max_shared = l.max_compute_workgroup_storage_size;
    for &kind in kinds {
        if Tiles::fitted(kind, variant, d as u32, max_shared).is_none() {
            let need = Tiles::of(kind, variant, d as u32).shared_bytes(kind, d as u32);
            return Err(Error::Unsupported(format!(
                "variant {} needs about {need} bytes of workgroup storage for head_dim {d}; this \
                 device allows {max_shared}",
                variant.name(),
            )));
        }
    }
    Ok(())
}

const BACKWARD: [Kind; 2] = [Kind::Dq, Kind::Dkdv];

/// Can this device run `variant` for head dim `d` (forward and backward)?
pub fn variant_supported(gpu: &Gpu, variant: Variant, d: usize) -> Result<()> {
    check_fits(gpu, variant, d, &[Kind::Fwd, Kind::Dq, Kind::Dkdv])
}

/// The fastest variants this device runs for head dim `d`: on the H100 the tallest tiles win
/// for both passes at head_dim 64 and 128 (docs/BENCHMARKS.md), so each pass takes the largest
/// variant that fits. The passes are chosen separately because their tiles need different
/// amounts of workgroup memory (at head_dim 256 the xl forward fits 48 KiB, its backward not).
pub fn auto_variants(gpu: &Gpu, d: usize) -> Result<Variants> {
    let pick = |kinds: &[Kind]| -> Result<Variant> {
        let mut last = None;
        for v in [Variant::Xl, Variant::Large, Variant::Portable] {
            match check_fits(gpu, v, d, kinds) {
                Ok(()) => return Ok(v),
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("at least one variant"))
    };
    Ok(Variants {
        forward: pick(&[Kind::Fwd])?,
        backward: pick(&BACKWARD)?,
    })
}

/// Split the (batch, kv-head) groups so that every binding fits the device's binding limit and
/// every grid dimension its dispatch limit.
fn plan_chunks(shape: &AttnShape, gpu: &Gpu, elem: u64) -> Result<Vec<Chunk>> {
    let l = gpu.limits();
    let g = shape.group() as u64;
    let per_unit = [
        (
            "query-shaped tensor (q, o, dO, dQ)",
            g * (shape.seq_q * shape.head_dim) as u64 * elem,
        ),
        (
            "key-shaped tensor (k, v, dK, dV)",
            (shape.seq_k * shape.head_dim) as u64 * elem,
        ),
        ("per-row tensor (LSE)", g * shape.seq_q as u64 * 4),
        ("per-key bias", shape.seq_k as u64 * 4),
    ];
    let tiles = (shape.seq_q.max(shape.seq_k) as u64).div_ceil(32);
    if tiles > l.max_compute_workgroups_per_dimension as u64 {
        return Err(Error::Unsupported(format!(
            "sequence of {} tokens needs {tiles} workgroups along one dimension; this device \
             allows {}",
            shape.seq_q.max(shape.seq_k),
            l.max_compute_workgroups_per_dimension
        )));
    }
    // Grid y holds the query heads of a chunk.
    let max_units = l.max_compute_workgroups_per_dimension as u64 / g;
    plan_units(
        gpu,
        (shape.batch * shape.heads_kv) as u64,
        &per_unit,
        max_units,
    )
}

/// Which window a tensor gets bound with in one chunk.
#[derive(Clone, Copy, Debug)]
enum Class {
    Q,
    Kv,
    Row,
    /// Per-key tensors: the bias and its gradient.
    Key,
}

/// Outputs of the forward pass.
#[derive(Debug)]
pub struct AttnOutput {
    /// `[batch, heads_q, seq_q, head_dim]`
    pub o: Tensor,
    /// `[batch, heads_q, seq_q]`, natural log of the softmax denominators (scaled logits).
    pub lse: Tensor,
}

/// The q, k and v of one attention call: `[b, hq, sq, d]`, then `[b, hkv, sk, d]` twice, and
/// the optional additive per-key bias `[b, hkv, sk]` (f32; given exactly when the op was built
/// with one): logit = scale·q·k + bias.
#[derive(Clone, Copy, Debug)]
pub struct Qkv<'a> {
    pub q: &'a Tensor,
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    pub bias: Option<&'a Tensor>,
}

impl<'a> Qkv<'a> {
    pub fn new(q: &'a Tensor, k: &'a Tensor, v: &'a Tensor) -> Self {
        Self {
            q,
            k,
            v,
            bias: None,
        }
    }

    pub fn bias(self, bias: Option<&'a Tensor>) -> Self {
        Self { bias, ..self }
    }
}

/// Gradients with the shapes of q, k and v, and of the bias when the op has one.
#[derive(Debug)]
pub struct AttnGrads {
    pub dq: Tensor,
    pub dk: Tensor,
    pub dv: Tensor,
    /// `[b, hkv, sk]` f32: present exactly when the op was built with a bias.
    pub dbias: Option<Tensor>,
}

impl AttnOutput {
    /// Uninitialised O and LSE for `shape` (the kernels overwrite every element).
    pub fn empty(gpu: &Gpu, shape: &AttnShape) -> Result<Self> {
        Self::empty_as(gpu, shape, DType::F32)
    }

    /// The same with O of `dtype` (LSE stays f32).
    pub fn empty_as(gpu: &Gpu, shape: &AttnShape, dtype: DType) -> Result<Self> {
        Ok(Self {
            o: gpu.empty(&shape.q_dims(), dtype)?,
            lse: gpu.empty(&shape.lse_dims(), DType::F32)?,
        })
    }
}

impl AttnGrads {
    /// Uninitialised dQ, dK, dV for `shape` (the kernels overwrite every element).
    pub fn empty(gpu: &Gpu, shape: &AttnShape) -> Result<Self> {
        Self::empty_as(gpu, shape, DType::F32)
    }

    /// The same in `dtype`.
    pub fn empty_as(gpu: &Gpu, shape: &AttnShape, dtype: DType) -> Result<Self> {
        Ok(Self {
            dq: gpu.empty(&shape.q_dims(), dtype)?,
            dk: gpu.empty(&shape.kv_dims(), dtype)?,
            dv: gpu.empty(&shape.kv_dims(), dtype)?,
            dbias: None,
        })
    }

    /// The same with a d bias `[b, hkv, sk]` (f32) when `bias`.
    pub fn empty_with(gpu: &Gpu, shape: &AttnShape, dtype: DType, bias: bool) -> Result<Self> {
        Ok(Self {
            dbias: match bias {
                true => Some(gpu.empty(&bias_dims(shape), DType::F32)?),
                false => None,
            },
            ..Self::empty_as(gpu, shape, dtype)?
        })
    }
}

/// Shape of a per-key bias and of its gradient: `[b, hkv, sk]`.
pub fn bias_dims(shape: &AttnShape) -> [usize; 3] {
    [shape.batch, shape.heads_kv, shape.seq_k]
}

/// The bias argument of a launch (`[b, hkv, sk]` f32), checked against whether the op `op` was
/// built with one: both ops word the mismatch the same way.
pub(crate) fn bias_input<'a>(
    op: &str,
    built_with: bool,
    bias: Option<&'a Tensor>,
    dims: &'a [usize],
) -> Result<Option<launch::Arg<'a>>> {
    match (bias, built_with) {
        (Some(b), true) => Ok(Some(input("bias", b, dims, DType::F32))),
        (None, false) => Ok(None),
        (Some(_), false) => invalid!("a bias was given to a {op} built without one (config: bias)"),
        (None, true) => invalid!("this {op} was built with a bias; none was given"),
    }
}

/// The d bias output of a backward, checked the same way.
pub(crate) fn dbias_output<'a>(
    op: &str,
    built_with: bool,
    dbias: Option<&'a Tensor>,
    dims: &'a [usize],
) -> Result<Option<launch::Arg<'a>>> {
    match (dbias, built_with) {
        (Some(d), true) => Ok(Some(output("dbias", d, dims, DType::F32))),
        (None, false) => Ok(None),
        (Some(_), false) => invalid!("a d bias was given to a {op} without a bias"),
        (None, true) => {
            invalid!("this {op} has a bias: its gradients need dbias (AttnGrads::empty_with)")
        }
    }
}

/// Storage buffers one kernel with a per-key bias binds at most (the dK/dV kernels: q, k, v,
/// dO, LSE, D, dK, dV, bias, d bias; the sparse one the selection too), against the device's
/// per-stage limit (8 under WebGPU's defaults): an error that says so instead of a pipeline
/// failure. Without a bias the kernels declare no bias bindings.
pub(crate) fn check_bias_bindings(gpu: &Gpu, op: &str, needed: u32) -> Result<()> {
    let have = gpu.limits().max_storage_buffers_per_shader_stage;
    if needed > have {
        return Err(Error::Unsupported(format!(
            "{op} with a per-key bias binds {needed} storage buffers in one kernel; this device \
             allows {have} per shader stage"
        )));
    }
    Ok(())
}

/// Full attention for one problem shape: validated once, pipelines fetched once.
#[derive(Debug)]
pub struct FullAttention {
    shape: AttnShape,
    opts: AttnOptions,
    variants: Variants,
    chunks: Vec<Chunk>,
    fwd: Arc<Pipeline>,
    /// Query rows per forward workgroup.
    fwd_rows: u32,
    dq: Arc<Pipeline>,
    /// Query rows per dQ workgroup.
    dq_rows: u32,
    dkdv: Arc<Pipeline>,
    /// Keys per dK/dV workgroup.
    dkdv_rows: u32,
    rowdot: RowDot,
    /// Scratch for D = rowsum(dO ∘ O) `[b, hq, sq]`, made once with the op.
    rowd: Tensor,
    storage: Storage,
    has_bias: bool,
}

/// What a [`FullAttention`] is built for besides the shape: one plain struct instead of a
/// ladder of constructors. `FullConfig::new(opts)` takes f32 tensors and the fastest variants.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FullConfig {
    pub options: AttnOptions,
    /// Element type of q, k, v, o and the gradients (F32 or F16; LSE is f32, arithmetic f32).
    pub dtype: DType,
    /// How f16 is kept; `None`: native where the device has SHADER_F16, packed in u32 elsewhere.
    pub storage: Option<Storage>,
    /// Kernel variant of each pass; `None`: the fastest this device runs for the dtype and
    /// head_dim (with f16, both passes on tensor cores where the device has them, unless a bias
    /// is given: the tensor-core kernels take none yet).
    pub variants: Option<Variants>,
    /// An additive per-key bias `[b, hkv, sk]` is given (NOSA), with its gradient.
    pub bias: bool,
}

impl FullConfig {
    pub fn new(options: AttnOptions) -> Self {
        Self {
            options,
            dtype: DType::F32,
            storage: None,
            variants: None,
            bias: false,
        }
    }

    pub fn bias(self, bias: bool) -> Self {
        Self { bias, ..self }
    }

    pub fn dtype(self, dtype: DType) -> Self {
        Self { dtype, ..self }
    }

    /// A storage fixes the dtype too.
    pub fn storage(self, storage: Storage) -> Self {
        Self {
            dtype: storage.dtype(),
            storage: Some(storage),
            ..self
        }
    }

    pub fn variants(self, variants: Variants) -> Self {
        Self {
            variants: Some(variants),
            ..self
        }
    }

    /// One variant for both passes.
    pub fn variant(self, variant: Variant) -> Self {
        self.variants(Variants::uniform(variant))
    }
}

impl FullAttention {
    /// Validate the problem, resolve the storage and variants, fetch the pipelines.
    pub fn new(gpu: &Gpu, shape: AttnShape, config: &FullConfig) -> Result<Self> {
        let opts = config.options;
        shape.validate(&opts)?;
        let storage = match config.storage {
            Some(s) if s.dtype() != config.dtype => invalid!(
                "storage {} does not hold {:?} tensors",
                s.name(),
                config.dtype
            ),
            Some(s) => s,
            None => Storage::for_dtype(gpu, config.dtype)?,
        };
        let variants = match config.variants {
            Some(v) => v,
            None if storage == Storage::F16
                && !config.bias
                && crate::ops::coop::supported(gpu, shape.head_dim).is_ok() =>
            {
                Variants::uniform(Variant::Coop)
            }
            None => auto_variants(gpu, shape.head_dim)?,
        };
        if config.bias && (variants.forward == Variant::Coop || variants.backward == Variant::Coop)
        {
            return Err(Error::Unsupported(
                "the cooperative-matrix attention kernels take no per-key bias yet; use a \
                 portable variant (portable, large, xl) with a bias"
                    .into(),
            ));
        }
        if config.bias {
            check_bias_bindings(gpu, "full attention", 10)?;
        }
        storage.check(gpu)?;
        check_fits(gpu, variants.forward, shape.head_dim, &[Kind::Fwd])?;
        check_fits(gpu, variants.backward, shape.head_dim, &BACKWARD)?;
        let chunks = plan_chunks(&shape, gpu, storage.dtype().size() as u64)?;
        let d = shape.head_dim as u32;
        let max_shared = gpu.limits().max_compute_workgroup_storage_size;
        let fit = |kind, v| Tiles::fitted(kind, v, d, max_shared).expect("checked above");
        let key = |file, entry, mut consts: Vec<(&'static str, u32)>| {
            consts.push(("HAS_BIAS", config.bias as u32));
            PipelineKey {
                file,
                entry,
                constants: consts,
                checked: false,
                storage,
            }
        };
        let (fwd, fwd_rows) = if variants.forward == Variant::Coop {
            if storage != Storage::F16 {
                return Err(Error::Unsupported(format!(
                    "the cooperative-matrix variant takes native f16 tensors, not {}",
                    storage.name()
                )));
            }
            let (p, t) = crate::ops::coop::forward_pipeline(gpu, d)?;
            (p, t.rows())
        } else {
            let t = fit(Kind::Fwd, variants.forward);
            let p = gpu.pipeline(&key(
                "attention_fwd.wgsl",
                "main",
                t.constants(Kind::Fwd, d),
            ))?;
            (p, t.rows())
        };
        let (dq, dq_rows) = if variants.backward == Variant::Coop {
            if storage != Storage::F16 {
                return Err(Error::Unsupported(format!(
                    "the cooperative-matrix variant takes native f16 tensors, not {}",
                    storage.name()
                )));
            }
            let (p, t) = crate::ops::coop::dq_pipeline(gpu, d)?;
            (p, t.rows())
        } else {
            let t = fit(Kind::Dq, variants.backward);
            let p = gpu.pipeline(&key(
                "attention_bwd.wgsl",
                "dq_main",
                t.constants(Kind::Dq, d),
            ))?;
            (p, t.rows())
        };
        let (dkdv, dkdv_rows) = if variants.backward == Variant::Coop {
            let (p, t) = crate::ops::coop::dkdv_pipeline(gpu, d)?;
            (p, t.rows())
        } else {
            let t = fit(Kind::Dkdv, variants.backward);
            let p = gpu.pipeline(&key(
                "attention_bwd.wgsl",
                "dkdv",
                t.constants(Kind::Dkdv, d),
            ))?;
            (p, t.rows())
        };
        let rowdot = RowDot::new(gpu, storage, shape.head_dim)?;
        Ok(Self {
            shape,
            opts,
            variants,
            chunks,
            fwd,
            fwd_rows,
            dq,
            dq_rows,
            dkdv,
            dkdv_rows,
            rowdot,
            rowd: gpu.empty(&shape.lse_dims(), DType::F32)?,
            storage,
            has_bias: config.bias,
        })
    }

    /// Storage of q, k, v, o and the gradients.
    pub fn storage(&self) -> Storage {
        self.storage
    }

    pub fn shape(&self) -> &AttnShape {
        &self.shape
    }
    pub fn variants(&self) -> Variants {
        self.variants
    }
    /// Built for a per-key bias (and its gradient).
    pub fn has_bias(&self) -> bool {
        self.has_bias
    }
    /// Number of launches per kernel (more than one when tensors exceed the binding limit).
    pub fn chunks(&self) -> usize {
        self.chunks.len()
    }

    fn params(&self, gpu: &Gpu, c: Chunk) -> Params {
        let s = &self.shape;
        let align = gpu.limits().min_storage_buffer_offset_alignment as u64;
        let (g, d) = (s.group() as u64, s.head_dim as u64);
        let scale = self.opts.scale_for(s.head_dim);
        let e = self.storage.dtype().size() as u64;
        Params {
            seq_q: s.seq_q as u32,
            seq_k: s.seq_k as u32,
            q_pos0: s.q_offset() as u32,
            causal: self.opts.causal as u32,
            group: s.group() as u32,
            q_off: window_sized(c.u0 * g * s.seq_q as u64 * d, 0, align, e).skip,
            k_off: window_sized(c.u0 * s.seq_k as u64 * d, 0, align, e).skip,
            r_off: window_sized(c.u0 * g * s.seq_q as u64, 0, align, 4).skip,
            scale_log2: scale * std::f32::consts::LOG2_E,
            scale,
            grid_x: 0,
            rows: 0,
            nsel: 0,
            i_off: 0,
            b_off: window_sized(c.u0 * s.seq_k as u64, 0, align, 4).skip,
            _pad: 0,
        }
    }

    fn window_of(&self, gpu: &Gpu, class: Class, c: Chunk) -> Window {
        let s = &self.shape;
        let align = gpu.limits().min_storage_buffer_offset_alignment as u64;
        let (g, d) = (s.group() as u64, s.head_dim as u64);
        let e = self.storage.dtype().size() as u64;
        let (per_unit, elem) = match class {
            Class::Q => (g * s.seq_q as u64 * d, e),
            Class::Kv => (s.seq_k as u64 * d, e),
            Class::Row => (g * s.seq_q as u64, 4),
            Class::Key => (s.seq_k as u64, 4),
        };
        window_sized(c.u0 * per_unit, (c.u1 - c.u0) * per_unit, align, elem)
    }

    /// One launch of `pipe` over `chunk` with the chunk's parameters and windows.
    fn dispatch(
        &self,
        gpu: &Gpu,
        enc: &mut Encoder,
        pipe: &Pipeline,
        chunk: Chunk,
        bindings: &[(u32, Class, &Tensor)],
        grid: (u32, u32),
    ) {
        let params = self.params(gpu, chunk);
        let views: Vec<(u32, &Tensor, Window)> = bindings
            .iter()
            .map(|&(b, class, t)| (b, t, self.window_of(gpu, class, chunk)))
            .collect();
        launch::dispatch(gpu, enc, pipe, bytemuck::bytes_of(&params), &views, grid);
    }

    /// The bias argument, checked against how the op was built.
    /// Record the forward pass into `enc`: O and LSE are overwritten.
    pub fn encode_forward(
        &self,
        gpu: &Gpu,
        enc: &mut Encoder,
        x: Qkv,
        out: &AttnOutput,
    ) -> Result<()> {
        let Qkv { q, k, v, bias } = x;
        let (o, lse) = (&out.o, &out.lse);
        let s = self.shape;
        let dt = self.storage.dtype();
        let (qd, kd, ld, bd) = (s.q_dims(), s.kv_dims(), s.lse_dims(), bias_dims(&s));
        let mut args = vec![
            input("q", q, &qd, dt),
            input("k", k, &kd, dt),
            input("v", v, &kd, dt),
            output("o", o, &qd, dt),
            output("lse", lse, &ld, DType::F32),
        ];
        args.extend(bias_input("full attention", self.has_bias, bias, &bd)?);
        check_args(&args)?;
        let mut views = vec![
            (1, Class::Q, q),
            (2, Class::Kv, k),
            (3, Class::Kv, v),
            (4, Class::Q, o),
            (5, Class::Row, lse),
        ];
        views.extend(bias.map(|b| (6, Class::Key, b)));
        for &c in &self.chunks {
            let heads = ((c.u1 - c.u0) * s.group() as u64) as u32;
            self.dispatch(
                gpu,
                enc,
                &self.fwd,
                c,
                &views,
                ((s.seq_q as u32).div_ceil(self.fwd_rows), heads),
            );
        }
        Ok(())
    }

    /// Record the backward pass of the forward that gave `out`; the gradients are overwritten.
    /// D = rowsum(dO ∘ O) goes through the op's own scratch (calls recorded one after another
    /// may share it: each call's kernels run in order).
    pub fn encode_backward(
        &self,
        gpu: &Gpu,
        enc: &mut Encoder,
        x: Qkv,
        out: &AttnOutput,
        d_o: &Tensor,
        grads: &AttnGrads,
    ) -> Result<()> {
        let Qkv { q, k, v, bias } = x;
        let (o, lse, rowd) = (&out.o, &out.lse, &self.rowd);
        let s = self.shape;
        let dt = self.storage.dtype();
        let (qd, kd, ld, bd) = (s.q_dims(), s.kv_dims(), s.lse_dims(), bias_dims(&s));
        let mut args = vec![
            input("q", q, &qd, dt),
            input("k", k, &kd, dt),
            input("v", v, &kd, dt),
            input("o", o, &qd, dt),
            input("lse", lse, &ld, DType::F32),
            input("dO", d_o, &qd, dt),
            output("dq", &grads.dq, &qd, dt),
            output("dk", &grads.dk, &kd, dt),
            output("dv", &grads.dv, &kd, dt),
        ];
        args.extend(bias_input("full attention", self.has_bias, bias, &bd)?);
        args.extend(dbias_output(
            "full attention",
            self.has_bias,
            grads.dbias.as_ref(),
            &bd,
        )?);
        check_args(&args)?;
        // What dkdv and dq both read.
        let inputs = [
            (1, Class::Q, q),
            (2, Class::Kv, k),
            (3, Class::Kv, v),
            (5, Class::Q, d_o),
            (6, Class::Row, lse),
            (7, Class::Row, rowd),
        ];
        let outs = [
            (8, Class::Q, &grads.dq),
            (9, Class::Kv, &grads.dk),
            (10, Class::Kv, &grads.dv),
        ];
        // Both entries read the bias; dkdv writes its gradient (checked present together).
        let bias_in: Vec<_> = bias.map(|b| (11, Class::Key, b)).into_iter().collect();
        let bias_out: Vec<_> = grads
            .dbias
            .as_ref()
            .map(|b| (12, Class::Key, b))
            .into_iter()
            .collect();
        for &c in &self.chunks {
            let base = self.params(gpu, c);
            let heads = ((c.u1 - c.u0) * s.group() as u64) as u32;
            let w = |class| self.window_of(gpu, class, c);
            self.rowdot.encode(
                gpu,
                enc,
                &base,
                heads * s.seq_q as u32,
                [(o, w(Class::Q)), (d_o, w(Class::Q)), (rowd, w(Class::Row))],
            );
            // The tensor-core kernels share one module whose store reaches all three gradients,
            // so both entries bind all three.
            let (dkdv_out, dq_out) = if self.variants.backward == Variant::Coop {
                (&outs[..], &outs[..])
            } else {
                (&outs[1..], &outs[..1])
            };
            self.dispatch(
                gpu,
                enc,
                &self.dkdv,
                c,
                &[&inputs[..], dkdv_out, &bias_in, &bias_out].concat(),
                (
                    (s.seq_k as u32).div_ceil(self.dkdv_rows),
                    (c.u1 - c.u0) as u32,
                ),
            );
            self.dispatch(
                gpu,
                enc,
                &self.dq,
                c,
                &[&inputs[..], dq_out, &bias_in].concat(),
                ((s.seq_q as u32).div_ceil(self.dq_rows), heads),
            );
        }
        Ok(())
    }

    /// Run the forward pass and return new O and LSE tensors.
    pub fn forward(&self, gpu: &Gpu, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<AttnOutput> {
        let s = self.shape;
        let out = AttnOutput::empty_as(gpu, &s, self.storage.dtype())?;
        self.forward_into(gpu, q, k, v, &out)?;
        Ok(out)
    }

    /// Run the forward pass into existing tensors.
    pub fn forward_into(
        &self,
        gpu: &Gpu,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &AttnOutput,
    ) -> Result<()> {
        let mut enc = gpu.encoder();
        self.encode_forward(gpu, &mut enc, Qkv::new(q, k, v), out)?;
        gpu.scoped("attention forward", || gpu.queue.submit([enc.finish()]))?;
        Ok(())
    }

    /// Run the backward pass and return new gradient tensors.
    pub fn backward(
        &self,
        gpu: &Gpu,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &AttnOutput,
        d_o: &Tensor,
    ) -> Result<AttnGrads> {
        let s = self.shape;
        let grads = AttnGrads::empty_with(gpu, &s, self.storage.dtype(), self.has_bias)?;
        self.backward_into(gpu, Qkv::new(q, k, v), out, d_o, &grads)?;
        Ok(grads)
    }

    /// Run the backward pass into existing gradient tensors.
    pub fn backward_into(
        &self,
        gpu: &Gpu,
        x: Qkv,
        out: &AttnOutput,
        d_o: &Tensor,
        grads: &AttnGrads,
    ) -> Result<()> {
        let mut enc = gpu.encoder();
        self.encode_backward(gpu, &mut enc, x, out, d_o, grads)?;
        gpu.scoped("attention backward", || gpu.queue.submit([enc.finish()]))?;
        Ok(())
    }
}

/// The attention shape implied by q `[b, hq, sq, d]` and k `[b, hkv, sk, d]`.
pub fn shape_of(q: &Tensor, k: &Tensor) -> Result<AttnShape> {
    let (qs, ks) = (q.shape(), k.shape());
    if qs.len() != 4 || ks.len() != 4 {
        invalid!(
            "q and k must be 4-D [batch, heads, seq, head_dim]; got {:?} and {:?}",
            qs,
            ks
        );
    }
    if qs[0] != ks[0] || qs[3] != ks[3] {
        invalid!("q {:?} and k {:?} disagree on batch or head_dim", qs, ks);
    }
    Ok(AttnShape {
        batch: qs[0],
        heads_q: qs[1],
        heads_kv: ks[1],
        seq_q: qs[2],
        seq_k: ks[2],
        head_dim: qs[3],
    })
}

/// One-shot forward: shape from the tensors, best variant, new outputs.
pub fn attention_forward(
    gpu: &Gpu,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    opts: &AttnOptions,
) -> Result<AttnOutput> {
    FullAttention::new(
        gpu,
        shape_of(q, k)?,
        &FullConfig::new(*opts).dtype(q.dtype()),
    )?
    .forward(gpu, q, k, v)
}

/// One-shot backward of [`attention_forward`].
pub fn attention_backward(
    gpu: &Gpu,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &AttnOutput,
    d_o: &Tensor,
    opts: &AttnOptions,
) -> Result<AttnGrads> {
    FullAttention::new(
        gpu,
        shape_of(q, k)?,
        &FullConfig::new(*opts).dtype(q.dtype()),
    )?
    .backward(gpu, q, k, v, out, d_o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn portable_variant_fits_webgpu_defaults() {
        // The portable variant must fit WebGPU's defaults for every supported head dim.
        for d in (16..=256).step_by(16) {
            for kind in [Kind::Fwd, Kind::Dq, Kind::Dkdv] {
                let t = Tiles::fitted(kind, Variant::Portable, d, 16384)
                    .unwrap_or_else(|| panic!("portable {kind:?} d={d} does not fit 16 KiB"));
                let tc = Tiles::tc(d);
                assert!(t.threads(d) <= 256);
                assert_eq!(t.cols % tc, 0, "{kind:?} d={d}");
                assert_eq!(d % (4 * tc), 0);
                assert_eq!(d % t.dc, 0);
                assert_eq!(t.cols % t.pc, 0);
                assert_eq!(t.pc % 4, 0);
            }
        }
    }
}
