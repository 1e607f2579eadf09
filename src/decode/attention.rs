//! Decoding attention on the GPU (`shaders/decode.wgsl`): the new tokens' queries against each
//! sequence's cache, the keys split into ranges (one workgroup each: a single sequence still
//! fills the GPU) whose partial results `combine` merges by their LSE. Reference:
//! `reference::decode` (the last rows of prefill attention).

use crate::gpu::Encoder;
use std::sync::Arc;

use crate::error::{Error, Result, invalid};
use crate::gpu::{DType, Gpu, Pipeline, PipelineKey, Storage, Tensor};
use crate::ops::attention::{AttnOutput, bias_input, check_bias_bindings};
use crate::ops::launch::{self, Arg, Chunk, check_args, input, output, plan_units, window_sized};
use crate::problem::{DecodeKeys, DecodeShape};

/// Threads per workgroup (a power of two).
const NT: usize = 128;
/// Keys a workgroup holds at most (its logits stay in workgroup memory), when they fit. 256
/// beat 512 (the first default) by 7-9% at 32k on the H200, batch 1 and 16, and 1024 lost by
/// half (`bench/decode-sweep.sh`, docs/BENCHMARKS.md, 2026-12-01).
const SPK_MAX: usize = 256;
/// Workgroups a step should launch at least (by splitting the keys) to fill a large GPU.
const TARGET_WORKGROUPS: usize = 1024;

crate::gpu::uniform::uniform!(
    "decode.wgsl",
    DecodeParams,
    /// Uniform block of `shaders/decode.wgsl`.
    pub(crate) struct DecodeParams {
        pub n_q: u32,
        pub cap: u32,
        pub heads_kv: u32,
        pub u0: u32,
        pub units: u32,
        pub nsel: u32,
        pub n_split: u32,
        pub split_keys: u32,
        pub scale_log2: f32,
        pub grid_x: u32,
        pub q_off: u32,
        pub k_off: u32,
        pub i_off: u32,
        pub b_off: u32,
        pub p_off: u32,
        pub l_off: u32,
        pub r_off: u32,
        pub stride: u32,
        pub _pad1: u32,
        pub _pad2: u32,
    }
);

/// What a [`DecodeAttention`] is built for besides the shape.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DecodeConfig {
    pub keys: DecodeKeys,
    /// Logit scale; `None` means 1/sqrt(head_dim).
    pub scale: Option<f32>,
    /// A per-key bias `[b, hkv, capacity]` (f32) is given (NOSA).
    pub bias: bool,
    /// q, the caches and o (F32 or F16; LSE, bias and the accumulation stay f32).
    pub dtype: DType,
    /// Keys per split range (1 to the kernel's limit, 512 or what the device's workgroup
    /// memory allows); `None`: chosen so that a step launches about a thousand workgroups.
    pub split_keys: Option<usize>,
    /// NOSA's offloaded cache (with [`DecodeKeys::Sparse`]): k, v and the bias are GPU slots,
    /// `[b, hkv, slots·block, d]`, and the selection holds (block, slot) pairs, u32
    /// `[b, hkv, n_q, 2·nsel]` (see `decode::offload`).
    pub slots: Option<usize>,
    /// Also build the dQ kernel ([`DecodeAttention::encode_dq`]: the backward of these rows for
    /// q, which sparse attention's training uses at small groups). It needs one key range per
    /// row, and takes every sequence as holding `capacity` tokens.
    pub dq: bool,
}

impl DecodeConfig {
    pub fn new(keys: DecodeKeys) -> Self {
        Self {
            keys,
            scale: None,
            bias: false,
            dtype: DType::F32,
            split_keys: None,
            slots: None,
            dq: false,
        }
    }
    pub fn dq(self, dq: bool) -> Self {
        Self { dq, ..self }
    }
    pub fn slots(self, slots: Option<usize>) -> Self {
        Self { slots, ..self }
    }
    pub fn bias(self, bias: bool) -> Self {
        Self { bias, ..self }
    }
    pub fn dtype(self, dtype: DType) -> Self {
        Self { dtype, ..self }
    }
    pub fn scale(self, scale: Option<f32>) -> Self {
        Self { scale, ..self }
    }
    pub fn split_keys(self, split_keys: Option<usize>) -> Self {
        Self { split_keys, ..self }
    }
}

/// The tensors of one step: q `[b, hq, n_q, d]`, the caches `[b, hkv, capacity, d]`, the
/// sequence lengths `[b]` (u32, on the GPU: the kernel clamps them to the capacity, and a
/// length below n_q leaves the first queries without keys), the selection
/// `[b, hkv, n_q, nsel]` (u32; [`DecodeKeys::Sparse`]) and the bias `[b, hkv, capacity]`.
#[derive(Clone, Copy, Debug)]
pub struct DecodeInputs<'a> {
    pub q: &'a Tensor,
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    pub lens: &'a Tensor,
    pub sel: Option<&'a Tensor>,
    pub bias: Option<&'a Tensor>,
}

impl<'a> DecodeInputs<'a> {
    pub fn new(q: &'a Tensor, k: &'a Tensor, v: &'a Tensor, lens: &'a Tensor) -> Self {
        Self {
            q,
            k,
            v,
            lens,
            sel: None,
            bias: None,
        }
    }
    pub fn sel(self, sel: Option<&'a Tensor>) -> Self {
        Self { sel, ..self }
    }
    pub fn bias(self, bias: Option<&'a Tensor>) -> Self {
        Self { bias, ..self }
    }
}

/// Workgroups `(x, y)` covering `n` with at most `max_x` along x.
fn grid(max_x: u64, n: u64) -> (u32, u32) {
    let gx = n.clamp(1, max_x);
    (gx as u32, n.div_ceil(gx) as u32)
}

/// Decoding attention for one shape: validated once, pipelines fetched once, the partial
/// results' scratch made once.
#[derive(Debug)]
pub struct DecodeAttention {
    shape: DecodeShape,
    config: DecodeConfig,
    storage: Storage,
    /// K read 16 bytes per load (KWIDE): its offsets must be 16-byte aligned.
    wide: bool,
    nsel: usize,
    /// Rows of k, v and the bias per (sequence, kv head): the capacity, or slots × block.
    stride: usize,
    n_split: usize,
    split_keys: usize,
    chunks: Vec<Chunk>,
    partial: Arc<Pipeline>,
    dq: Option<Arc<Pipeline>>,
    combine: Option<Arc<Pipeline>>,
    /// Partial O `[b, hq, n_q, n_split, d]` and LSE `[b, hq, n_q, n_split]` (f32).
    opart: Tensor,
    lpart: Tensor,
}

#[derive(Clone, Copy)]
enum Class {
    Q,
    Kv,
    Lse,
    Sel,
    Bias,
    OPart,
    LPart,
}

impl DecodeAttention {
    pub fn new(gpu: &Gpu, shape: DecodeShape, config: &DecodeConfig) -> Result<Self> {
        let DecodeConfig {
            keys,
            scale,
            bias,
            dtype,
            split_keys,
            slots,
            dq,
        } = *config;
        shape.validate(&keys, scale)?;
        let stride = match (slots, keys) {
            (None, _) => shape.capacity,
            (Some(n), DecodeKeys::Sparse { block, nsel }) => {
                if n < nsel {
                    invalid!("{n} GPU slots cannot hold a selection of {nsel} blocks");
                }
                n * block
            }
            (Some(_), DecodeKeys::Full) => {
                invalid!("GPU slots hold selected blocks: full decoding reads the whole cache")
            }
        };
        let storage = Storage::for_dtype(gpu, dtype)?;
        let (d, g) = (shape.head_dim, shape.group());
        let (nsel, block) = match keys {
            DecodeKeys::Full => (0, 1),
            DecodeKeys::Sparse { block, nsel } => (nsel, block),
        };
        if g > 32 {
            return Err(Error::Unsupported(format!(
                "{g} query heads per kv head; the decoding kernel takes up to 32"
            )));
        }
        if bias {
            // q, k, v, lens, partial O and LSE, the selection and the bias.
            check_bias_bindings(gpu, "decoding attention", 6 + (nsel > 0) as u32 + 2)?;
        }
        // Virtual keys of one (unit, query): the cache, or the selected blocks.
        let total = match keys {
            DecodeKeys::Full => shape.capacity,
            DecodeKeys::Sparse { block, nsel } => nsel * block,
        };
        let l = gpu.limits();
        let d4 = d / 4;
        // Developer knob: SPARSE_ATTN_DECODE=vu,kcv,spk,workgroups,kwide (V rows loaded ahead,
        // K vec4 per load round, keys per workgroup at most, workgroups a step aims for, 16-byte
        // K loads 0/1).
        let knob = crate::ops::tiles::tuning("SPARSE_ATTN_DECODE", None).unwrap_or_default();
        let pick = |i: usize, ok: &[usize], default: usize| {
            knob.get(i)
                .map(|&x| x as usize)
                .filter(|x| ok.contains(x))
                .unwrap_or(default)
        };
        // Workgroup memory: q (G rows, f32), the range's logits (G x SPK), its keys, the
        // reduction scratch (G x NT) and the rows' max and sum.
        let shared =
            |spk: usize| (g * d4 * 16 + g * spk * 4 + spk * 4 + g * NT * 4 + 2 * g * 4) as u64;
        // dQ keeps the rows' dO in workgroup memory as well.
        let shared = |spk: usize| shared(spk) + (dq as usize * g * d4 * 16) as u64;
        let max_shared = l.max_compute_workgroup_storage_size as u64;
        let rows = shape.batch * shape.heads_kv * shape.n_q;
        let target = pick(3, &[256, 512, 1024, 2048, 4096, 8192], TARGET_WORKGROUPS);
        // Rows that fill the GPU by themselves (a prefill, training) take their keys in one
        // range where they fit (no combine pass); so do dQ and explicit split ranges.
        let one_range = dq || (split_keys.is_none() && rows >= target);
        let want = split_keys.unwrap_or(if one_range { total } else { 0 });
        let spk_max =
            pick(2, &[128, 256, 512, 1024, 2048], SPK_MAX).max(want.min(2048).next_power_of_two());
        let spk = [2048, 1024, 512, 256, 128]
            .into_iter()
            .filter(|&k| k <= spk_max.max(d) && k >= d.max(NT))
            .find(|&k| shared(k) <= max_shared)
            .ok_or_else(|| {
                Error::Unsupported(format!(
                    "the decoding kernel for {g} query heads per kv head and head_dim {d} needs \
                     {} bytes of workgroup memory; this device has {max_shared}",
                    shared(d.max(NT).next_power_of_two())
                ))
            })?;
        let split_keys = match split_keys {
            Some(s) => {
                if s == 0 || s > spk {
                    invalid!(
                        "split_keys = {s}: a split range holds 1 to {spk} keys for this shape \
                         and device"
                    );
                }
                s
            }
            None if one_range => spk,
            None => {
                let ranges = target.div_ceil(rows).max(1);
                total.div_ceil(ranges).next_multiple_of(32).min(spk)
            }
        };
        let n_split = total.div_ceil(split_keys).max(1);
        if dq && n_split > 1 {
            return Err(Error::Unsupported(format!(
                "the dQ kernel takes a row's {total} keys in one workgroup; this device's \
                 workgroup memory holds {spk} for {g} query heads per kv head and head_dim {d}"
            )));
        }
        if (l.max_compute_invocations_per_workgroup as usize) < NT
            || (l.max_compute_workgroup_size_x as usize) < NT
        {
            return Err(Error::Unsupported(format!(
                "the decoding kernel uses {NT} invocations per workgroup; this device allows {}",
                l.max_compute_invocations_per_workgroup
            )));
        }
        // P V: GT heads per thread (each V row read once for them), the largest divisor of G
        // up to 8 (registers); ITEMS (head group, vec4 column) pairs; LANES key lanes.
        let gt = (1..=g.min(8))
            .rev()
            .find(|t| g.is_multiple_of(*t))
            .unwrap_or(1);
        let items = d4 * g / gt;
        let lanes = (NT / items).max(1);
        // 16-byte K loads for 16-bit storage: phase 1 reads a row per thread, so a warp's load
        // touches 32 rows; 8-byte loads took twice the instructions (H200, 32k, batch 16:
        // 32.5 -> 26.4 ms a step, docs/BENCHMARKS.md). 16-byte V loads measured slower (34.1).
        let kwide = storage != Storage::F32 && d4.is_multiple_of(2) && pick(4, &[0, 1], 1) == 1;
        let kl = 1 + kwide as usize;
        let kcv = pick(1, &[1, 2, 4, 8, 16, 32], 8).min(d4).max(kl);
        let kcv = (kl..=kcv)
            .rev()
            .find(|c| d4.is_multiple_of(*c) && c.is_multiple_of(kl))
            .unwrap_or(kl);
        let e = dtype.size() as u64;
        let (nq, dd, gg, ns) = (shape.n_q as u64, d as u64, g as u64, n_split as u64);
        let mut per_unit = vec![
            ("query-shaped tensor (q, o)", gg * nq * dd * e),
            ("cache (k, v)", stride as u64 * dd * e),
            ("partial O", gg * nq * ns * dd * 4),
        ];
        let pair = 1 + slots.is_some() as u64;
        if nsel > 0 {
            per_unit.push(("selection", nq * nsel as u64 * 4 * pair));
        }
        if bias {
            per_unit.push(("bias", stride as u64 * 4));
        }
        let max_dim = l.max_compute_workgroups_per_dimension as u64;
        let chunks = plan_units(
            gpu,
            (shape.batch * shape.heads_kv) as u64,
            &per_unit,
            (max_dim * max_dim) / (nq * ns * gg),
        )?;
        let direct = n_split == 1;
        // V rows loaded ahead per thread and lane (16 was the fastest of 4-64 on the H200 for
        // the first kernel, docs/BENCHMARKS.md).
        let vu = pick(0, &[1, 2, 4, 8, 16, 32], 16) as u32;
        let key = |entry, dq: bool| PipelineKey {
            file: "decode.wgsl",
            entry,
            constants: vec![
                ("D", d as u32),
                ("G", g as u32),
                ("NT", NT as u32),
                ("SPK", spk as u32),
                ("KCV", kcv as u32),
                // dQ reads K a row per thread and by columns: 8-byte loads.
                ("KWIDE", (kwide && !dq) as u32),
                ("DQ", dq as u32),
                ("GT", gt as u32),
                ("ITEMS", items as u32),
                ("LANES", lanes as u32),
                ("VU", vu),
                ("SPARSE", (nsel > 0) as u32),
                ("SLOTS", slots.is_some() as u32),
                ("BLK", block as u32),
                ("HAS_BIAS", bias as u32),
                ("DIRECT", (direct || dq) as u32),
            ],
            checked: false,
            storage,
        };
        let partial = gpu.pipeline(&key("partial", false))?;
        let combine = match direct {
            true => None,
            false => Some(gpu.pipeline(&key("combine", false))?),
        };
        let dq = match dq {
            true => Some(gpu.pipeline(&key("dq", true))?),
            false => None,
        };
        let rows = shape.batch * shape.heads_q * shape.n_q;
        Ok(Self {
            shape,
            config: *config,
            storage,
            wide: kwide,
            nsel,
            stride,
            n_split,
            split_keys,
            chunks,
            partial,
            combine,
            dq,
            // One range per row writes O and LSE itself: no partial results.
            opart: gpu.empty(&[if direct { 1 } else { rows * n_split * d }], DType::F32)?,
            lpart: gpu.empty(&[if direct { 1 } else { rows * n_split }], DType::F32)?,
        })
    }

    pub fn shape(&self) -> &DecodeShape {
        &self.shape
    }

    /// Key ranges per (sequence, kv head, query), and the keys of each.
    pub fn split(&self) -> (usize, usize) {
        (self.n_split, self.split_keys)
    }

    fn window(&self, gpu: &Gpu, class: Class, c: Chunk) -> launch::Window {
        let s = &self.shape;
        let (g, nq, d, cap) = (
            s.group() as u64,
            s.n_q as u64,
            s.head_dim as u64,
            self.stride as u64,
        );
        let pair = 1 + self.config.slots.is_some() as u64;
        let ns = self.n_split as u64;
        let e = self.storage.dtype().size() as u64;
        let (per_unit, elem) = match class {
            Class::Q => (g * nq * d, e),
            Class::Kv => (cap * d, e),
            Class::Lse => (g * nq, 4),
            Class::Sel => (nq * self.nsel as u64 * pair, 4),
            Class::Bias => (cap, 4),
            Class::OPart => (g * nq * ns * d, 4),
            Class::LPart => (g * nq * ns, 4),
        };
        let align = gpu.limits().min_storage_buffer_offset_alignment as u64;
        window_sized(c.u0 * per_unit, (c.u1 - c.u0) * per_unit, align, elem)
    }

    /// The selection and bias of `x` (dims `sd`, `bd`: `selection_dims`), checked against how
    /// this op was built.
    fn selection_args<'a>(
        &self,
        x: &DecodeInputs<'a>,
        sd: &'a [usize],
        bd: &'a [usize],
    ) -> Result<Vec<Arg<'a>>> {
        let mut args = Vec::new();
        match (x.sel, self.nsel > 0) {
            (Some(t), true) => args.push(input("selection", t, sd, DType::U32)),
            (None, false) => {}
            (None, true) => {
                invalid!("this decoding attention runs over a selection; none was given")
            }
            (Some(_), false) => invalid!(
                "a selection was given to full decoding attention (build it with DecodeKeys::Sparse)"
            ),
        }
        args.extend(bias_input(
            "decoding attention",
            self.config.bias,
            x.bias,
            bd,
        )?);
        Ok(args)
    }

    /// The selection's and the bias's dims.
    fn selection_dims(&self) -> ([usize; 4], [usize; 3]) {
        let s = self.shape;
        let pair = 1 + self.config.slots.is_some() as usize;
        (
            s.sel_dims(self.nsel * pair),
            [s.batch, s.heads_kv, self.stride],
        )
    }

    /// The uniform block of chunk `c`, `gx` workgroups along x.
    fn params(&self, gpu: &Gpu, c: Chunk, gx: u32) -> Result<DecodeParams> {
        let s = &self.shape;
        let w = |class| self.window(gpu, class, c);
        let scale = self
            .config
            .scale
            .unwrap_or(1.0 / (s.head_dim as f32).sqrt());
        let p = DecodeParams {
            n_q: s.n_q as u32,
            cap: s.capacity as u32,
            heads_kv: s.heads_kv as u32,
            u0: c.u0 as u32,
            units: (c.u1 - c.u0) as u32,
            nsel: self.nsel as u32,
            n_split: self.n_split as u32,
            split_keys: self.split_keys as u32,
            scale_log2: scale * std::f32::consts::LOG2_E,
            grid_x: gx,
            q_off: w(Class::Q).skip,
            k_off: w(Class::Kv).skip,
            i_off: if self.nsel > 0 { w(Class::Sel).skip } else { 0 },
            b_off: if self.config.bias {
                w(Class::Bias).skip
            } else {
                0
            },
            p_off: w(Class::OPart).skip,
            l_off: w(Class::LPart).skip,
            r_off: w(Class::Lse).skip,
            stride: self.stride as u32,
            _pad1: 0,
            _pad2: 0,
        };
        if self.wide && !p.k_off.is_multiple_of(8) {
            // Offsets are multiples of D elements in bindings aligned to >= 32 bytes.
            invalid!(
                "decoding attention: K offset {} is not 16-byte aligned",
                p.k_off
            );
        }
        Ok(p)
    }

    /// Record one step into `enc`: `out.o` `[b, hq, n_q, d]` and `out.lse` `[b, hq, n_q]`.
    pub fn encode(
        &self,
        gpu: &Gpu,
        enc: &mut Encoder,
        x: &DecodeInputs,
        out: &AttnOutput,
    ) -> Result<()> {
        let s = self.shape;
        let dt = self.storage.dtype();
        let (qd, ld) = (s.q_dims(), s.lse_dims());
        let cd = [s.batch, s.heads_kv, self.stride, s.head_dim];
        let lens_d = [s.batch];
        let mut args = vec![
            input("q", x.q, &qd, dt),
            input("k", x.k, &cd, dt),
            input("v", x.v, &cd, dt),
            input("lens", x.lens, &lens_d, DType::U32),
            output("o", &out.o, &qd, dt),
            output("lse", &out.lse, &ld, DType::F32),
        ];
        let (sd, bd) = self.selection_dims();
        args.extend(self.selection_args(x, &sd, &bd)?);
        check_args(&args)?;
        let max_x = gpu.limits().max_compute_workgroups_per_dimension as u64;
        let lens_w = window_sized(0, s.batch as u64, 256, 4);
        for &c in &self.chunks {
            let units = c.u1 - c.u0;
            let w = |class| self.window(gpu, class, c);
            let (gx, gy) = grid(max_x, units * s.n_q as u64 * self.n_split as u64);
            let p = self.params(gpu, c, gx)?;
            let mut views = vec![
                (1, x.q, w(Class::Q)),
                (2, x.k, w(Class::Kv)),
                (3, x.v, w(Class::Kv)),
                (4, x.lens, lens_w),
            ];
            if let Some(t) = x.sel {
                views.push((7, t, w(Class::Sel)));
            }
            if let Some(t) = x.bias {
                views.push((8, t, w(Class::Bias)));
            }
            let parts = [
                (9, &self.opart, w(Class::OPart)),
                (10, &self.lpart, w(Class::LPart)),
            ];
            let finals = [(5, &out.o, w(Class::Q)), (6, &out.lse, w(Class::Lse))];
            match &self.combine {
                None => {
                    views.extend(finals);
                    launch::dispatch(
                        gpu,
                        enc,
                        &self.partial,
                        bytemuck::bytes_of(&p),
                        &views,
                        (gx, gy),
                    );
                }
                Some(combine) => {
                    views.extend(parts);
                    launch::dispatch(
                        gpu,
                        enc,
                        &self.partial,
                        bytemuck::bytes_of(&p),
                        &views,
                        (gx, gy),
                    );
                    let (cx, cy) = grid(max_x, units * s.group() as u64 * s.n_q as u64);
                    let pc = DecodeParams { grid_x: cx, ..p };
                    launch::dispatch(
                        gpu,
                        enc,
                        combine,
                        bytemuck::bytes_of(&pc),
                        &[&parts[..], &finals[..]].concat(),
                        (cx, cy),
                    );
                }
            }
        }
        Ok(())
    }

    /// Record dQ `[b, hq, n_q, d]` of the rows a forward of this op computed (built with
    /// [`DecodeConfig::dq`]): `lse` is that forward's LSE, `d_o` the gradient of its O and `rowd`
    /// D = rowsum(dO ∘ O) `[b, hq, n_q]` (f32). `x.lens` is not read: every sequence holds
    /// `capacity` tokens.
    #[allow(clippy::too_many_arguments)]
    pub fn encode_dq(
        &self,
        gpu: &Gpu,
        enc: &mut Encoder,
        x: &DecodeInputs,
        lse: &Tensor,
        d_o: &Tensor,
        rowd: &Tensor,
        dq: &Tensor,
    ) -> Result<()> {
        let Some(pipe) = &self.dq else {
            invalid!("this decoding attention was built without its dQ kernel (DecodeConfig::dq)")
        };
        let s = self.shape;
        let dt = self.storage.dtype();
        let (qd, ld) = (s.q_dims(), s.lse_dims());
        let cd = [s.batch, s.heads_kv, self.stride, s.head_dim];
        let mut args = vec![
            input("q", x.q, &qd, dt),
            input("k", x.k, &cd, dt),
            input("v", x.v, &cd, dt),
            input("lse", lse, &ld, DType::F32),
            input("dO", d_o, &qd, dt),
            input("D", rowd, &ld, DType::F32),
            output("dq", dq, &qd, dt),
        ];
        let (sd, bd) = self.selection_dims();
        args.extend(self.selection_args(x, &sd, &bd)?);
        check_args(&args)?;
        let max_x = gpu.limits().max_compute_workgroups_per_dimension as u64;
        for &c in &self.chunks {
            let w = |class| self.window(gpu, class, c);
            let (gx, gy) = grid(max_x, (c.u1 - c.u0) * s.n_q as u64);
            let p = self.params(gpu, c, gx)?;
            let mut views = vec![
                (1, x.q, w(Class::Q)),
                (2, x.k, w(Class::Kv)),
                (3, x.v, w(Class::Kv)),
                (5, dq, w(Class::Q)),
                (6, lse, w(Class::Lse)),
                (9, d_o, w(Class::Q)),
                (10, rowd, w(Class::Lse)),
            ];
            if let Some(t) = x.sel {
                views.push((7, t, w(Class::Sel)));
            }
            if let Some(t) = x.bias {
                views.push((8, t, w(Class::Bias)));
            }
            launch::dispatch(gpu, enc, pipe, bytemuck::bytes_of(&p), &views, (gx, gy));
        }
        Ok(())
    }

    /// Run one step and return new O and LSE tensors.
    pub fn forward(&self, gpu: &Gpu, x: &DecodeInputs) -> Result<AttnOutput> {
        let s = self.shape;
        let out = AttnOutput {
            o: gpu.empty(&s.q_dims(), self.storage.dtype())?,
            lse: gpu.empty(&s.lse_dims(), DType::F32)?,
        };
        let mut enc = gpu.encoder();
        self.encode(gpu, &mut enc, x, &out)?;
        gpu.scoped("decoding attention", || gpu.queue.submit([enc.finish()]))?;
        Ok(out)
    }
}
