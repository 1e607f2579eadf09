//! Block-sparse attention on the GPU (`shaders/sparse_fwd.wgsl`): exact softmax over the keys of
//! the blocks a selection names (see `ops::select`), causal inside the current block, GQA with
//! the G query heads of a group in one workgroup, optional additive per-key bias.
//! Reference: `reference::sparse`. The backward pass is not implemented yet.

use std::sync::Arc;

use crate::error::{Error, Result, invalid};
use crate::gpu::{DType, Gpu, Pipeline, PipelineKey, Tensor};
use crate::ops::attention::{AttnOutput, Kind, Tiles, head_dim_supported};
use crate::ops::launch::{self, Chunk, Window, plan_units, window};
use crate::reference::sparse::SparseOptions;
use crate::shape::AttnShape;

/// Uniform block shared with `shaders/common.wgsl` (`Params`).
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    seq_q: u32,
    seq_k: u32,
    q_pos0: u32,
    causal: u32,
    group: u32,
    q_off: u32,
    k_off: u32,
    r_off: u32,
    scale_log2: f32,
    scale: f32,
    grid_x: u32,
    rows: u32,
    nsel: u32,
    i_off: u32,
    b_off: u32,
    _pad: u32,
}

#[derive(Clone, Copy, Debug)]
enum Class {
    Q,
    Kv,
    Row,
    Sel,
    Bias,
}

/// Block-sparse attention for one problem shape and selection width.
#[derive(Debug)]
pub struct SparseAttention {
    shape: AttnShape,
    opts: SparseOptions,
    nsel: usize,
    has_bias: bool,
    chunks: Vec<Chunk>,
    fwd: Arc<Pipeline>,
}

impl SparseAttention {
    /// `nsel` blocks per (token, kv head); `has_bias`: a per-key bias `[b, hkv, seq_k]` is given.
    pub fn new(
        gpu: &Gpu,
        shape: AttnShape,
        opts: SparseOptions,
        nsel: usize,
        has_bias: bool,
    ) -> Result<Self> {
        opts.validate(&shape, nsel)?;
        let d = shape.head_dim;
        if !head_dim_supported(d) {
            invalid!(
                "head_dim = {d} is not supported: the kernels take multiples of 16 from 16 to 256"
            );
        }
        let g = shape.group();
        if g > 128 {
            return Err(Error::Unsupported(format!(
                "{g} query heads per kv head; the sparse kernel takes up to 128"
            )));
        }
        // Rows: the group's query heads (16 thread rows of TM). Key tiles: up to 64 keys of a block.
        let tm = g.div_ceil(16).next_power_of_two() as u32;
        let cols = opts.block.min(64) as u32;
        let l = gpu.limits();
        let threads = 16 * Tiles::tc(d as u32);
        if l.max_compute_invocations_per_workgroup < threads {
            return Err(Error::Unsupported(format!(
                "the sparse kernel uses {threads} invocations per workgroup; this device allows {}",
                l.max_compute_invocations_per_workgroup
            )));
        }
        let mut tiles = Tiles {
            tm,
            cols,
            dc: 16,
            pc: cols.min(16),
        };
        let max_shared = l.max_compute_workgroup_storage_size;
        while tiles.shared_bytes(Kind::Fwd, d as u32) > max_shared {
            if tiles.pc > 4 {
                tiles.pc /= 2;
            } else if tiles.dc > 8 {
                tiles.dc /= 2;
            } else {
                return Err(Error::Unsupported(format!(
                    "the sparse kernel for {g} query heads per kv head and head_dim {d} needs \
                     {} bytes of workgroup memory; this device allows {max_shared}",
                    tiles.shared_bytes(Kind::Fwd, d as u32)
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
            ("query-shaped tensor (q, o)", g as u64 * sq * dd * 4),
            ("key-shaped tensor (k, v)", sk * dd * 4),
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
        let mut constants = tiles.constants(Kind::Fwd, d as u32);
        constants.push(("BLK", opts.block as u32));
        constants.push(("HAS_BIAS", has_bias as u32));
        let fwd = gpu.pipeline(&PipelineKey {
            file: "sparse_fwd.wgsl",
            entry: "main",
            constants,
            checked: false,
        })?;
        Ok(Self {
            shape,
            opts,
            nsel,
            has_bias,
            chunks,
            fwd,
        })
    }

    /// `[b, hkv, seq_q, nsel]`
    pub fn selection_dims(&self) -> [usize; 4] {
        let s = &self.shape;
        [s.batch, s.heads_kv, s.seq_q, self.nsel]
    }

    /// `[b, hkv, seq_k]`
    pub fn bias_dims(&self) -> [usize; 3] {
        let s = &self.shape;
        [s.batch, s.heads_kv, s.seq_k]
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
        let per_unit = match class {
            Class::Q => g * sq * d,
            Class::Kv => sk * d,
            Class::Row => g * sq,
            Class::Sel => sq * self.nsel as u64,
            Class::Bias => sk,
        };
        let align = gpu.limits().min_storage_buffer_offset_alignment as u64;
        window(c.u0 * per_unit, (c.u1 - c.u0) * per_unit, align)
    }

    /// Record the forward pass: O and LSE are overwritten.
    #[allow(clippy::too_many_arguments)]
    pub fn encode_forward(
        &self,
        gpu: &Gpu,
        enc: &mut wgpu::CommandEncoder,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        sel: &Tensor,
        bias: Option<&Tensor>,
        out: &AttnOutput,
    ) -> Result<()> {
        let s = self.shape;
        let check = |name: &str, t: &Tensor, dims: &[usize], dtype: DType| -> Result<()> {
            if t.shape() != dims || t.dtype() != dtype {
                invalid!(
                    "{name} is {:?} {:?}; this sparse attention needs {dtype:?} {dims:?}",
                    t.dtype(),
                    t.shape()
                );
            }
            Ok(())
        };
        check("q", q, &s.q_dims(), DType::F32)?;
        check("k", k, &s.kv_dims(), DType::F32)?;
        check("v", v, &s.kv_dims(), DType::F32)?;
        check("selection", sel, &self.selection_dims(), DType::U32)?;
        check("o", &out.o, &s.q_dims(), DType::F32)?;
        check("lse", &out.lse, &s.lse_dims(), DType::F32)?;
        match (bias, self.has_bias) {
            (Some(b), true) => check("bias", b, &self.bias_dims(), DType::F32)?,
            (None, false) => {}
            (Some(_), false) => invalid!("a bias was given to a sparse attention built without"),
            (None, true) => invalid!("this sparse attention was built with a bias; give one"),
        }
        for (n, t) in [("o", &out.o), ("lse", &out.lse)] {
            for (m, i) in [("q", q), ("k", k), ("v", v), ("selection", sel)] {
                if t.buffer() == i.buffer() {
                    invalid!("output {n} shares its buffer with {m}; give each output its own");
                }
            }
        }
        // Without a bias the binding still needs a buffer; the kernel never reads it.
        let dummy;
        let bias_t = match bias {
            Some(b) => b,
            None => {
                dummy = gpu.empty(&[1], DType::F32)?;
                &dummy
            }
        };
        let scale = self.opts.attn().scale_for(s.head_dim);
        for &c in &self.chunks {
            let w = |class| self.window_of(gpu, class, c);
            let p = Params {
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
                b_off: if bias.is_some() {
                    w(Class::Bias).skip
                } else {
                    0
                },
                _pad: 0,
            };
            let bias_w = match bias {
                Some(_) => w(Class::Bias),
                None => window(0, 1, 256),
            };
            launch::dispatch(
                gpu,
                enc,
                &self.fwd,
                bytemuck::bytes_of(&p),
                &[
                    (1, q, w(Class::Q)),
                    (2, k, w(Class::Kv)),
                    (3, v, w(Class::Kv)),
                    (4, &out.o, w(Class::Q)),
                    (5, &out.lse, w(Class::Row)),
                    (6, sel, w(Class::Sel)),
                    (7, bias_t, bias_w),
                ],
                (s.seq_q as u32, (c.u1 - c.u0) as u32),
            );
        }
        Ok(())
    }

    /// Run the forward pass and return new O and LSE tensors.
    pub fn forward(
        &self,
        gpu: &Gpu,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        sel: &Tensor,
        bias: Option<&Tensor>,
    ) -> Result<AttnOutput> {
        let s = self.shape;
        let out = AttnOutput {
            o: gpu.empty(&s.q_dims(), DType::F32)?,
            lse: gpu.empty(&s.lse_dims(), DType::F32)?,
        };
        let mut enc = gpu.device.create_command_encoder(&Default::default());
        self.encode_forward(gpu, &mut enc, q, k, v, sel, bias, &out)?;
        gpu.scoped("sparse attention forward", || {
            gpu.queue.submit([enc.finish()])
        })?;
        Ok(out)
    }
}
