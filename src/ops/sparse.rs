//! Block-sparse attention on the GPU (`shaders/sparse_fwd.wgsl`): exact softmax over the keys of
//! the blocks a selection names (see `ops::select`), causal inside the current block, GQA with
//! the G query heads of a group in one workgroup, optional additive per-key bias.
//! Backward (`shaders/sparse_bwd.wgsl`): dQ per token over its blocks, dK/dV per key block over
//! the tokens that selected it (deterministic order, no atomics). Small groups (G <= 4) run the
//! forward and dQ as row kernels instead (`SparseKernel::Rows`: the decoding kernel of
//! `decode::attention` with every token a query row). Reference: `reference::sparse`.

use crate::gpu::Encoder;
use std::sync::Arc;

use crate::decode::attention::{DecodeAttention, DecodeConfig, DecodeInputs};
use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, Pipeline, PipelineKey, Storage, Tensor};
use crate::ops::attention::{AttnGrads, AttnOutput, bias_input, check_bias_bindings, dbias_output};
use crate::ops::launch::{
    self, Arg, Chunk, Params, Window, check_args, input, output, plan_units, window_sized,
};
use crate::ops::rowdot::RowDot;
use crate::ops::tiles::{Kind, Tiles, fit_sparse, sparse_tiles};
use crate::problem::{AttnShape, DecodeKeys, DecodeShape};
use crate::problem::{SelectOptions, SparseOptions};

#[derive(Clone, Copy, Debug)]
enum Class {
    Q,
    Kv,
    Row,
    Sel,
    Bias,
}

/// Which kernels run the sparse forward, or the sparse backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SparseKernel {
    /// The kernels measured fastest on the H100 at SSA's settings (docs/BENCHMARKS.md): the
    /// portable forward (the tensor-core forward is correct but slower), and the tensor-core
    /// backward where the device and shape allow it (1.2x the portable one), else portable.
    Auto,
    /// f32 arithmetic on any device (`shaders/sparse_fwd.wgsl`, `shaders/sparse_bwd.wgsl`).
    Portable,
    /// Tensor cores (`shaders/sparse_coop.wgsl`, `shaders/sparse_coop_bwd.wgsl`, `ops::coop`):
    /// native f16 tensors, up to 16 query heads per kv head, blocks of a multiple of 16 keys.
    Coop,
    /// Row kernels for small groups (`shaders/decode.wgsl` through `DecodeAttention`: a
    /// workgroup per (token, kv head), a thread per selected key; the tiled kernels hold a
    /// token's G heads as the rows of a tile, a handful of threads at G = 4):
    /// the forward, and in the backward dQ (dK/dV stay the portable kernel's). Causal only, up
    /// to 32 query heads per kv head, and a token's selected keys within one workgroup's
    /// memory (k·block up to 2048).
    Rows,
}

impl SparseKernel {
    pub fn name(self) -> &'static str {
        match self {
            SparseKernel::Auto => "auto",
            SparseKernel::Portable => "portable",
            SparseKernel::Coop => "coop",
            SparseKernel::Rows => "rows",
        }
    }
}

/// Block-sparse attention for one problem shape and selection width.
#[derive(Debug)]
pub struct SparseAttention {
    shape: AttnShape,
    opts: SparseOptions,
    nsel: usize,
    has_bias: bool,
    chunks: Vec<Chunk>,
    /// The tiled forward's pipeline (none where the row kernels run it).
    fwd: Option<Arc<Pipeline>>,
    /// The forward kernel (resolved: never Auto) and the tokens one of its workgroups takes.
    forward: SparseKernel,
    fwd_tokens: u32,
    /// The backward kernels (resolved), the tokens one dQ workgroup takes, and the dK/dV
    /// kernel's bindings (the tensor-core module binds all three gradients in both entries).
    backward: SparseKernel,
    dq_tokens: u32,
    /// The tiled dQ's pipeline (none where the row kernels run dQ).
    dq: Option<Arc<Pipeline>>,
    dkdv: Arc<Pipeline>,
    /// `Rows`' dK/dV runs the tensor-core kernel (f16, where the device has them).
    dkdv_coop: bool,
    rowdot: RowDot,
    /// The row kernels (forward and/or dQ) and the sequence lengths they read (all seq_k).
    rows: Option<(DecodeAttention, Tensor)>,
    /// Scratch for D = rowsum(dO ∘ O) `[b, hq, sq]`, made once with the op.
    rowd: Tensor,
    storage: Storage,
}

/// The tensors of one sparse attention call: q, k, v (as for full attention), the selection
/// `[b, hkv, sq, nsel]` (u32 block indices, see `ops::select`) and the optional per-key bias
/// `[b, hkv, sk]` (f32; given exactly when the op was built with `bias`).
#[derive(Clone, Copy, Debug)]
pub struct SparseInputs<'a> {
    pub q: &'a Tensor,
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    pub sel: &'a Tensor,
    pub bias: Option<&'a Tensor>,
}

impl<'a> SparseInputs<'a> {
    /// Without a bias.
    pub fn new(q: &'a Tensor, k: &'a Tensor, v: &'a Tensor, sel: &'a Tensor) -> Self {
        Self {
            q,
            k,
            v,
            sel,
            bias: None,
        }
    }

    pub fn bias(self, bias: Option<&'a Tensor>) -> Self {
        Self { bias, ..self }
    }
}

/// What a [`SparseAttention`] is built for besides the shape.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SparseConfig {
    pub options: SparseOptions,
    /// Blocks per (token, kv head) in the selection tensor.
    pub nsel: usize,
    /// A per-key bias `[b, hkv, seq_k]` is given (NOSA).
    pub bias: bool,
    /// q, k, v, o and gradients (F32 or F16; LSE, bias and the accumulation stay f32).
    pub dtype: DType,
    /// The forward and backward kernels; `Coop` where the device or shape cannot run it is an
    /// error that says why.
    pub forward: SparseKernel,
    pub backward: SparseKernel,
}

impl SparseConfig {
    pub fn new(options: SparseOptions, nsel: usize) -> Self {
        Self {
            options,
            nsel,
            bias: false,
            dtype: DType::F32,
            forward: SparseKernel::Auto,
            backward: SparseKernel::Auto,
        }
    }

    /// Attention over the blocks a selection with `select` picks: its block size, mask, scale
    /// and k.
    pub fn for_selection(select: &SelectOptions) -> Self {
        Self::new(select.sparse(), select.k)
    }

    pub fn bias(self, bias: bool) -> Self {
        Self { bias, ..self }
    }

    pub fn dtype(self, dtype: DType) -> Self {
        Self { dtype, ..self }
    }

    pub fn kernels(self, forward: SparseKernel, backward: SparseKernel) -> Self {
        Self {
            forward,
            backward,
            ..self
        }
    }
}

/// Groups up to this many query heads per kv head take the row kernels under `Auto`. H200
/// (docs/BENCHMARKS.md, 2026-12-01): at G = 4 (training's model: head_dim 48, blocks of 16,
/// k = 16) the forward 6.06 -> 1.63 ms and the backward 15.7 -> 7.4 ms; at G = 8 and 16
/// (head_dim 128, f16, 16k tokens) the tiled kernels were faster (13.1 vs 15.4, 7.8 vs 18.5 ms).
const ROWS_MAX_GROUP: usize = 4;

/// Whether the row kernels ([`SparseKernel::Rows`]) take this problem, or why not.
fn rows_supported(shape: &AttnShape, opts: &SparseOptions, nsel: usize) -> Result<()> {
    if !opts.causal {
        return Err(Error::Unsupported(
            "the row kernels for sparse attention are causal only".into(),
        ));
    }
    if shape.group() > 32 {
        return Err(Error::Unsupported(format!(
            "the row kernels take up to 32 query heads per kv head, not {}",
            shape.group()
        )));
    }
    if nsel * opts.block > 2048 {
        return Err(Error::Unsupported(format!(
            "the row kernels hold a token's selected keys in one workgroup: {nsel} blocks of {} \
             are more than 2048",
            opts.block
        )));
    }
    Ok(())
}

impl SparseAttention {
    pub fn new(gpu: &Gpu, shape: AttnShape, config: &SparseConfig) -> Result<Self> {
        let SparseConfig {
            options: opts,
            nsel,
            bias: has_bias,
            dtype,
            forward,
            backward,
        } = *config;
        let storage = Storage::for_dtype(gpu, dtype)?;
        let e = dtype.size() as u64;
        opts.validate(&shape, nsel)?;
        let d = shape.head_dim;
        let g = shape.group();
        if g > 128 {
            return Err(Error::Unsupported(format!(
                "{g} query heads per kv head; the sparse kernel takes up to 128"
            )));
        }
        let l = gpu.limits();
        let max_shared = l.max_compute_workgroup_storage_size;
        let too_big = |what: &str| {
            Error::Unsupported(format!(
                "the sparse {what} kernel for {g} query heads per kv head, block {} and head_dim \
                 {d} needs more than the {max_shared} bytes of workgroup memory this device has",
                opts.block
            ))
        };
        let [fwd_t, dq_t, dkdv_t] = sparse_tiles(g as u32, opts.block as u32, d as u32);
        let tiles = fit_sparse(fwd_t, Kind::Fwd, d as u32, max_shared, 16)
            .ok_or_else(|| too_big("forward"))?;

        // dK/dV's token line: scan flags (NT), waiting tokens (NT + cols), per-column data.
        let line = |t: Tiles| 4 * (2 * t.threads(d as u32) + 3 * t.cols) + 16;
        let min_cols = (g as u32).next_power_of_two().max(Tiles::tc(d as u32));
        let dq_tiles =
            fit_sparse(dq_t, Kind::Dq, d as u32, max_shared, 16).ok_or_else(|| too_big("dQ"))?;
        // Fewer columns (tokens per tile) before smaller staging steps.
        let mut dkdv_t = dkdv_t;
        while dkdv_t.shared_bytes(Kind::Dkdv, d as u32) + line(dkdv_t) > max_shared
            && dkdv_t.cols / 2 >= min_cols
        {
            dkdv_t.cols /= 2;
            dkdv_t.pc = dkdv_t.pc.min(dkdv_t.cols);
        }
        let dkdv_tiles = fit_sparse(dkdv_t, Kind::Dkdv, d as u32, max_shared, line(dkdv_t))
            .ok_or_else(|| too_big("dK/dV"))?;
        if dkdv_tiles.cols > dkdv_tiles.threads(d as u32) {
            return Err(Error::Unsupported(format!(
                "the sparse dK/dV kernel for {g} query heads per kv head and head_dim {d} needs \
                 more columns than threads; use a larger head_dim or fewer heads per kv head"
            )));
        }
        for t in [tiles, dq_tiles, dkdv_tiles] {
            let threads = t.threads(d as u32);
            if l.max_compute_invocations_per_workgroup < threads
                || l.max_compute_workgroup_size_x < threads
            {
                return Err(Error::Unsupported(format!(
                    "the sparse kernels use {threads} invocations per workgroup; this device allows {}",
                    l.max_compute_invocations_per_workgroup
                )));
            }
        }
        if shape.seq_q > l.max_compute_workgroups_per_dimension as usize {
            return Err(Error::Unsupported(format!(
                "{} query tokens exceed this device's dispatch limit of {} per launch",
                shape.seq_q, l.max_compute_workgroups_per_dimension
            )));
        }
        let (sq, sk, dd) = (shape.seq_q as u64, shape.seq_k as u64, d as u64);
        let per_unit = [
            ("query-shaped tensor (q, o)", g as u64 * sq * dd * e),
            ("key-shaped tensor (k, v)", sk * dd * e),
            ("LSE", g as u64 * sq * 4),
            ("selection", sq * nsel as u64 * 4),
            ("bias", sk * 4),
        ];
        let chunks = plan_units(
            gpu,
            (shape.batch * shape.heads_kv) as u64,
            &per_unit,
            l.max_compute_workgroups_per_dimension as u64,
        )?;
        let key = |file, entry, t: Tiles, kind| {
            let mut constants = t.constants(kind, d as u32);
            constants.push(("BLK", opts.block as u32));
            constants.push(("HAS_BIAS", has_bias as u32));
            PipelineKey {
                file,
                entry,
                constants,
                checked: false,
                storage,
            }
        };
        let f16_only = |pass: &str| {
            if storage != Storage::F16 {
                return Err(Error::Unsupported(format!(
                    "the cooperative-matrix sparse {pass} takes native f16 tensors, not {}",
                    storage.name()
                )));
            }
            Ok(())
        };
        let coop_ok = || {
            f16_only("forward")?;
            crate::ops::coop::sparse_supported(gpu, d, g, opts.block)
        };
        if has_bias {
            check_bias_bindings(gpu, "sparse attention", 11)?;
        }
        let rows_ok = rows_supported(&shape, &opts, nsel);
        // Larger groups on tensor cores where the device runs them (H200, 16384, d 128, G 16,
        // blocks of 16, k 16: 4.63 ms against 7.77 for the portable forward,
        // bench/results/h200-peers-2026-12-02/).
        let forward = match forward {
            SparseKernel::Auto if g <= ROWS_MAX_GROUP && rows_ok.is_ok() => SparseKernel::Rows,
            SparseKernel::Auto if coop_ok().is_ok() => SparseKernel::Coop,
            SparseKernel::Auto => SparseKernel::Portable,
            k => k,
        };
        let coop_bwd_ok = storage == Storage::F16
            && crate::ops::coop::sparse_backward_supported(gpu, d, g, opts.block).is_ok();
        // Small groups take the row dQ even where the tensor-core backward runs (H200, G 4, d
        // 48, f16: dQ rows 11.5 ms against 37.3 on tensor cores), with the tensor-core dK/dV
        // below.
        let backward = match backward {
            SparseKernel::Auto if g <= ROWS_MAX_GROUP && rows_ok.is_ok() => SparseKernel::Rows,
            SparseKernel::Auto if coop_bwd_ok => SparseKernel::Coop,
            SparseKernel::Auto => SparseKernel::Portable,
            k => k,
        };
        let (mut forward, mut backward) = (forward, backward);
        let use_rows = forward == SparseKernel::Rows || backward == SparseKernel::Rows;
        let build_rows = || -> Result<(DecodeAttention, Tensor)> {
            rows_ok?;
            let ds = DecodeShape {
                batch: shape.batch,
                heads_q: shape.heads_q,
                heads_kv: shape.heads_kv,
                n_q: shape.seq_q,
                capacity: shape.seq_k,
                head_dim: d,
            };
            let keys = DecodeKeys::Sparse {
                block: opts.block,
                nsel,
            };
            let config = DecodeConfig::new(keys)
                .bias(has_bias)
                .dtype(dtype)
                .scale(Some(opts.attn().scale_for(d)))
                .dq(backward == SparseKernel::Rows);
            let op = DecodeAttention::new(gpu, ds, &config)?;
            let lens = gpu.upload_u32(&[shape.batch], &vec![shape.seq_k as u32; shape.batch])?;
            Ok((op, lens))
        };
        let rows = match use_rows.then(build_rows) {
            None => None,
            Some(Ok(r)) => Some(r),
            // Chosen by `Auto` only (e.g. a device whose workgroup memory cannot hold a token's
            // keys): the portable kernels instead.
            Some(Err(_))
                if config.forward != SparseKernel::Rows
                    && config.backward != SparseKernel::Rows =>
            {
                for k in [&mut forward, &mut backward] {
                    if *k == SparseKernel::Rows {
                        *k = SparseKernel::Portable;
                    }
                }
                None
            }
            Some(Err(e)) => return Err(e),
        };
        // Only the pipelines this op runs are built (each is a compilation, long on lavapipe).
        let (fwd, fwd_tokens) = match forward {
            SparseKernel::Coop => {
                coop_ok()?;
                let (p, t) = crate::ops::coop::sparse_forward_pipeline(
                    gpu,
                    d as u32,
                    opts.block as u32,
                    has_bias,
                )?;
                (Some(p), t.nsg)
            }
            SparseKernel::Rows => (None, 1),
            _ => (
                Some(gpu.pipeline(&key("sparse_fwd.wgsl", "main", tiles, Kind::Fwd))?),
                1,
            ),
        };
        // The row dQ's dK/dV: on tensor cores where they run (H200, G 4, d 48, f16: 9.4 ms
        // against 33.3 for the tiled kernel in f32).
        let dkdv_coop = backward == SparseKernel::Rows && coop_bwd_ok;
        let coop_keys = || {
            crate::ops::coop::sparse_backward_keys(
                gpu,
                d as u32,
                g as u32,
                opts.block as u32,
                has_bias,
            )
        };
        let (dq, dq_tokens, dkdv) = if backward == SparseKernel::Coop {
            f16_only("backward")?;
            crate::ops::coop::sparse_backward_supported(gpu, d, g, opts.block)?;
            let (dq, tokens, dkdv) = coop_keys()?;
            (Some(gpu.pipeline(&dq)?), tokens, gpu.pipeline(&dkdv)?)
        } else {
            let dq = match backward {
                SparseKernel::Rows => None,
                _ => Some(gpu.pipeline(&key("sparse_bwd.wgsl", "dq_main", dq_tiles, Kind::Dq))?),
            };
            let dkdv = match dkdv_coop {
                true => gpu.pipeline(&coop_keys()?.2)?,
                false => gpu.pipeline(&key("sparse_bwd.wgsl", "dkdv", dkdv_tiles, Kind::Dkdv))?,
            };
            (dq, 1, dkdv)
        };
        let rowdot = RowDot::new(gpu, storage, d)?;
        Ok(Self {
            shape,
            opts,
            nsel,
            has_bias,
            chunks,
            fwd,
            forward,
            fwd_tokens,
            backward,
            dq_tokens,
            dq,
            dkdv,
            dkdv_coop,
            rowdot,
            rows,
            rowd: gpu.empty(&shape.lse_dims(), DType::F32)?,
            storage,
        })
    }

    /// Whether dK/dV runs on tensor cores (the `Coop` backward, or `Rows`' dK/dV in f16).
    pub fn dkdv_on_tensor_cores(&self) -> bool {
        self.backward == SparseKernel::Coop || self.dkdv_coop
    }

    /// The kernel the forward runs (`Portable`, `Coop` or `Rows`).
    pub fn forward_kernel(&self) -> SparseKernel {
        self.forward
    }

    /// The kernels the backward runs (`Portable`, `Coop` or `Rows`).
    pub fn backward_kernel(&self) -> SparseKernel {
        self.backward
    }

    /// `[b, hkv, seq_q, nsel]`
    pub fn selection_dims(&self) -> [usize; 4] {
        let s = &self.shape;
        [s.batch, s.heads_kv, s.seq_q, self.nsel]
    }

    /// `[b, hkv, seq_k]`
    pub fn bias_dims(&self) -> [usize; 3] {
        crate::ops::attention::bias_dims(&self.shape)
    }

    /// Launches per forward (more than one when tensors exceed the binding limit).
    pub fn chunks(&self) -> usize {
        self.chunks.len()
    }

    fn window_of(&self, gpu: &Gpu, class: Class, c: Chunk) -> Window {
        let s = &self.shape;
        let (g, sq, sk, d) = (
            s.group() as u64,
            s.seq_q as u64,
            s.seq_k as u64,
            s.head_dim as u64,
        );
        let e = self.storage.dtype().size() as u64;
        let (per_unit, elem) = match class {
            Class::Q => (g * sq * d, e),
            Class::Kv => (sk * d, e),
            Class::Row => (g * sq, 4),
            Class::Sel => (sq * self.nsel as u64, 4),
            Class::Bias => (sk, 4),
        };
        let align = gpu.limits().min_storage_buffer_offset_alignment as u64;
        window_sized(c.u0 * per_unit, (c.u1 - c.u0) * per_unit, align, elem)
    }

    /// q, k, v, selection and bias (which must match how this op was built) plus the launch's
    /// other tensors, checked together.
    fn check_inputs(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        sel: &Tensor,
        bias: Option<&Tensor>,
        rest: &[Arg],
    ) -> Result<()> {
        let s = self.shape;
        let dt = self.storage.dtype();
        let (qd, kd, sd, bd) = (
            s.q_dims(),
            s.kv_dims(),
            self.selection_dims(),
            self.bias_dims(),
        );
        let mut args = vec![
            input("q", q, &qd, dt),
            input("k", k, &kd, dt),
            input("v", v, &kd, dt),
            input("selection", sel, &sd, DType::U32),
        ];
        args.extend(bias_input("sparse attention", self.has_bias, bias, &bd)?);
        for a in rest {
            args.push(a.clone());
        }
        check_args(&args)
    }

    fn params(&self, gpu: &Gpu, c: Chunk) -> Params {
        let s = &self.shape;
        let w = |class| self.window_of(gpu, class, c);
        let scale = self.opts.attn().scale_for(s.head_dim);
        Params {
            seq_q: s.seq_q as u32,
            seq_k: s.seq_k as u32,
            q_pos0: s.q_offset() as u32,
            causal: self.opts.causal as u32,
            group: s.group() as u32,
            q_off: w(Class::Q).skip,
            k_off: w(Class::Kv).skip,
            r_off: w(Class::Row).skip,
            scale_log2: scale * std::f32::consts::LOG2_E,
            scale,
            grid_x: 0,
            rows: 0,
            nsel: self.nsel as u32,
            i_off: w(Class::Sel).skip,
            b_off: if self.has_bias {
                w(Class::Bias).skip
            } else {
                0
            },
            _pad: 0,
        }
    }

    /// A per-key tensor's binding at `slot` (the kernels declare none without a bias).
    fn key_view<'a>(
        &self,
        gpu: &Gpu,
        c: Chunk,
        slot: u32,
        t: Option<&'a Tensor>,
    ) -> Option<(u32, &'a Tensor, Window)> {
        t.map(|t| (slot, t, self.window_of(gpu, Class::Bias, c)))
    }

    /// Record the forward pass: O and LSE are overwritten.
    pub fn encode_forward(
        &self,
        gpu: &Gpu,
        enc: &mut Encoder,
        x: &SparseInputs,
        out: &AttnOutput,
    ) -> Result<()> {
        let SparseInputs { q, k, v, sel, bias } = *x;
        let s = self.shape;
        let (qd, ld) = (s.q_dims(), s.lse_dims());
        self.check_inputs(
            q,
            k,
            v,
            sel,
            bias,
            &[
                output("o", &out.o, &qd, self.storage.dtype()),
                output("lse", &out.lse, &ld, DType::F32),
            ],
        )?;
        if let (SparseKernel::Rows, Some((op, lens))) = (self.forward, &self.rows) {
            let x = DecodeInputs::new(q, k, v, lens).sel(Some(sel)).bias(bias);
            return op.encode(gpu, enc, &x, out);
        }
        for &c in &self.chunks {
            let w = |class| self.window_of(gpu, class, c);
            let mut views = vec![
                (1, q, w(Class::Q)),
                (2, k, w(Class::Kv)),
                (3, v, w(Class::Kv)),
                (4, &out.o, w(Class::Q)),
                (5, &out.lse, w(Class::Row)),
                (6, sel, w(Class::Sel)),
            ];
            views.extend(self.key_view(gpu, c, 7, bias));
            let fwd = self.fwd.as_ref().expect("a tiled forward has its pipeline");
            launch::dispatch(
                gpu,
                enc,
                fwd,
                bytemuck::bytes_of(&self.params(gpu, c)),
                &views,
                (
                    (s.seq_q as u32).div_ceil(self.fwd_tokens),
                    (c.u1 - c.u0) as u32,
                ),
            );
        }
        Ok(())
    }

    /// Record the backward pass of the forward that gave `out`; the gradients are overwritten.
    /// D = rowsum(dO ∘ O) goes through the op's own scratch (as in `FullAttention`).
    pub fn encode_backward(
        &self,
        gpu: &Gpu,
        enc: &mut Encoder,
        x: &SparseInputs,
        out: &AttnOutput,
        d_o: &Tensor,
        grads: &AttnGrads,
    ) -> Result<()> {
        let SparseInputs { q, k, v, sel, bias } = *x;
        let rowd = &self.rowd;
        let s = self.shape;
        let dt = self.storage.dtype();
        let (qd, kd, ld, bd) = (s.q_dims(), s.kv_dims(), s.lse_dims(), self.bias_dims());
        let mut rest = vec![
            input("o", &out.o, &qd, dt),
            input("lse", &out.lse, &ld, DType::F32),
            input("dO", d_o, &qd, dt),
            output("dq", &grads.dq, &qd, dt),
            output("dk", &grads.dk, &kd, dt),
            output("dv", &grads.dv, &kd, dt),
        ];
        rest.extend(dbias_output(
            "sparse attention",
            self.has_bias,
            grads.dbias.as_ref(),
            &bd,
        )?);
        self.check_inputs(q, k, v, sel, bias, &rest)?;
        let nb = s.seq_k.div_ceil(self.opts.block) as u32;
        for &c in &self.chunks {
            let w = |class| self.window_of(gpu, class, c);
            let base = self.params(gpu, c);
            let units = (c.u1 - c.u0) as u32;
            self.rowdot.encode(
                gpu,
                enc,
                &base,
                units * s.group() as u32 * s.seq_q as u32,
                [
                    (&out.o, w(Class::Q)),
                    (d_o, w(Class::Q)),
                    (rowd, w(Class::Row)),
                ],
            );
            let mut inputs = vec![
                (1, q, w(Class::Q)),
                (2, k, w(Class::Kv)),
                (3, v, w(Class::Kv)),
                (5, d_o, w(Class::Q)),
                (6, &out.lse, w(Class::Row)),
                (7, rowd, w(Class::Row)),
                (11, sel, w(Class::Sel)),
            ];
            inputs.extend(self.key_view(gpu, c, 12, bias));
            let dbias: Vec<_> = self
                .key_view(gpu, c, 13, grads.dbias.as_ref())
                .into_iter()
                .collect();
            let outs = [
                (8, &grads.dq, w(Class::Q)),
                (9, &grads.dk, w(Class::Kv)),
                (10, &grads.dv, w(Class::Kv)),
            ];
            // The tensor-core module declares all three gradients.
            let dq_out = match self.backward == SparseKernel::Coop {
                true => &outs[..],
                false => &outs[..1],
            };
            let dkdv_out = match self.backward == SparseKernel::Coop || self.dkdv_coop {
                true => &outs[..],
                false => &outs[1..],
            };
            // The row kernels' dQ (no pipeline here) runs after D is complete for every chunk
            // (below).
            if let Some(dq) = &self.dq {
                launch::dispatch(
                    gpu,
                    enc,
                    dq,
                    bytemuck::bytes_of(&base),
                    &[&inputs[..], dq_out].concat(),
                    ((s.seq_q as u32).div_ceil(self.dq_tokens), units),
                );
            }
            launch::dispatch(
                gpu,
                enc,
                &self.dkdv,
                bytemuck::bytes_of(&base),
                &[&inputs[..], dkdv_out, &dbias].concat(),
                (nb, units),
            );
        }
        if let (SparseKernel::Rows, Some((op, lens))) = (self.backward, &self.rows) {
            let x = DecodeInputs::new(q, k, v, lens).sel(Some(sel)).bias(bias);
            op.encode_dq(gpu, enc, &x, &out.lse, d_o, rowd, &grads.dq)?;
        }
        Ok(())
    }

    /// Run the forward pass and return new O and LSE tensors.
    pub fn forward(&self, gpu: &Gpu, x: &SparseInputs) -> Result<AttnOutput> {
        let s = self.shape;
        let out = AttnOutput::empty_as(gpu, &s, self.storage.dtype())?;
        let mut enc = gpu.encoder();
        self.encode_forward(gpu, &mut enc, x, &out)?;
        gpu.scoped("sparse attention forward", || {
            gpu.queue.submit([enc.finish()])
        })?;
        Ok(out)
    }

    /// Run the backward pass and return new gradient tensors.
    pub fn backward(
        &self,
        gpu: &Gpu,
        x: &SparseInputs,
        out: &AttnOutput,
        d_o: &Tensor,
    ) -> Result<AttnGrads> {
        let s = self.shape;
        let grads = AttnGrads::empty_with(gpu, &s, self.storage.dtype(), self.has_bias)?;
        let mut enc = gpu.encoder();
        self.encode_backward(gpu, &mut enc, x, out, d_o, &grads)?;
        gpu.scoped("sparse attention backward", || {
            gpu.queue.submit([enc.finish()])
        })?;
        Ok(grads)
    }
}
