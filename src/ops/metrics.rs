//! Attention metrics on the GPU (`shaders/metrics.wgsl`): block-level attention map, attention
//! sparsity of a selection and attention entropy, per (batch, query head, token).
//! Definitions and reference: `reference::metrics`.

use crate::gpu::Encoder;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, Pipeline, PipelineKey, Tensor};
use crate::ops::launch::{self, Chunk, Window, check_args, input, output, plan_units, window};
use crate::problem::{AttnOptions, AttnShape, SparseOptions};

const THREADS: u32 = 64;

crate::gpu::uniform::uniform!(
    "metrics.wgsl",
    MetParams,
    pub(crate) struct Params {
        pub seq_q: u32,
        pub seq_k: u32,
        pub q_pos0: u32,
        pub causal: u32,
        pub group: u32,
        pub nb: u32,
        pub nsel: u32,
        pub scale_log2: f32,
        pub q_off: u32,
        pub k_off: u32,
        pub i_off: u32,
        pub m_off: u32,
        pub r_off: u32,
        pub _pad: [u32; 3],
    }
);

#[derive(Clone, Copy, Debug)]
enum Class {
    Q,
    K,
    Sel,
    Mass,
    Row,
}

/// Metrics of one attention problem.
#[derive(Debug)]
pub struct MetricsOut {
    /// `[b, hq, seq_q, nb]`: full-attention mass of each key block (the block attention map).
    pub block_mass: Tensor,
    /// `[b, hq, seq_q]`: share of the full mass inside the selected blocks.
    pub sparsity: Tensor,
    /// `[b, hq, seq_q]`: entropy of the full attention (nats).
    pub entropy: Tensor,
}

/// Metrics for one shape, block size and selection width.
#[derive(Debug)]
pub struct AttentionMetrics {
    shape: AttnShape,
    opts: AttnOptions,
    block: usize,
    nsel: usize,
    nb: usize,
    chunks: Vec<Chunk>,
    pipe: Arc<Pipeline>,
}

impl AttentionMetrics {
    /// Metrics of full attention (mask and scale from `sparse`) against selections of `nsel`
    /// blocks of `sparse.block` keys per (token, kv head).
    pub fn new(gpu: &Gpu, shape: AttnShape, sparse: SparseOptions, nsel: usize) -> Result<Self> {
        sparse.validate(&shape, nsel)?;
        let (opts, block) = (sparse.attn(), sparse.block);
        let l = gpu.limits();
        if shape.seq_q.div_ceil(THREADS as usize) > l.max_compute_workgroups_per_dimension as usize
        {
            return Err(Error::Unsupported(format!(
                "{} query tokens exceed this device's dispatch limit",
                shape.seq_q
            )));
        }
        let nb = shape.seq_k.div_ceil(block);
        let (g, sq, sk, d) = (
            shape.group() as u64,
            shape.seq_q as u64,
            shape.seq_k as u64,
            shape.head_dim as u64,
        );
        let per_unit = [
            ("query tensor", g * sq * d * 4),
            ("key tensor", sk * d * 4),
            ("selection", sq * nsel as u64 * 4),
            ("block attention map", g * sq * nb as u64 * 4),
        ];
        let chunks = plan_units(
            gpu,
            (shape.batch * shape.heads_kv) as u64,
            &per_unit,
            l.max_compute_workgroups_per_dimension as u64 / g,
        )?;
        let pipe = gpu.pipeline(&PipelineKey {
            file: "metrics.wgsl",
            entry: "main",
            constants: vec![
                ("D", shape.head_dim as u32),
                ("BLK", block as u32),
                ("NT", THREADS),
            ],
            checked: false,
            storage: crate::gpu::Storage::F32,
        })?;
        Ok(Self {
            shape,
            opts,
            block,
            nsel,
            nb,
            chunks,
            pipe,
        })
    }

    fn window_of(&self, gpu: &Gpu, class: Class, c: Chunk) -> Window {
        let s = &self.shape;
        let (g, sq, d) = (s.group() as u64, s.seq_q as u64, s.head_dim as u64);
        let per_unit = match class {
            Class::Q => g * sq * d,
            Class::K => s.seq_k as u64 * d,
            Class::Sel => sq * self.nsel as u64,
            Class::Mass => g * sq * self.nb as u64,
            Class::Row => g * sq,
        };
        let align = gpu.limits().min_storage_buffer_offset_alignment as u64;
        window(c.u0 * per_unit, (c.u1 - c.u0) * per_unit, align)
    }

    /// Metrics of full attention on q, k against the selection `sel` (`[b, hkv, seq_q, nsel]`).
    /// New output tensors for this shape (the kernel overwrites every element).
    pub fn empty_out(&self, gpu: &Gpu) -> Result<MetricsOut> {
        let s = self.shape;
        Ok(MetricsOut {
            block_mass: gpu.empty(&[s.batch, s.heads_q, s.seq_q, self.nb], DType::F32)?,
            sparsity: gpu.empty(&s.lse_dims(), DType::F32)?,
            entropy: gpu.empty(&s.lse_dims(), DType::F32)?,
        })
    }

    /// Compute the metrics of q, k and a selection into new tensors.
    pub fn compute(&self, gpu: &Gpu, q: &Tensor, k: &Tensor, sel: &Tensor) -> Result<MetricsOut> {
        let out = self.empty_out(gpu)?;
        let mut enc = gpu.encoder();
        self.encode(gpu, &mut enc, q, k, sel, &out)?;
        gpu.scoped("attention metrics", || gpu.queue.submit([enc.finish()]))?;
        Ok(out)
    }

    /// Record the metrics into `out` (see [`Self::empty_out`] for its shapes).
    pub fn encode(
        &self,
        gpu: &Gpu,
        enc: &mut Encoder,
        q: &Tensor,
        k: &Tensor,
        sel: &Tensor,
        out: &MetricsOut,
    ) -> Result<()> {
        let s = self.shape;
        let (qd, kd, rd) = (s.q_dims(), s.kv_dims(), s.lse_dims());
        let sd = [s.batch, s.heads_kv, s.seq_q, self.nsel];
        let md = [s.batch, s.heads_q, s.seq_q, self.nb];
        check_args(&[
            input("q", q, &qd, DType::F32),
            input("k", k, &kd, DType::F32),
            input("selection", sel, &sd, DType::U32),
            output("block_mass", &out.block_mass, &md, DType::F32),
            output("sparsity", &out.sparsity, &rd, DType::F32),
            output("entropy", &out.entropy, &rd, DType::F32),
        ])?;
        let scale = self.opts.scale_for(s.head_dim);
        for &c in &self.chunks {
            let w = |class| self.window_of(gpu, class, c);
            let p = Params {
                seq_q: s.seq_q as u32,
                seq_k: s.seq_k as u32,
                q_pos0: s.q_offset() as u32,
                causal: self.opts.causal as u32,
                group: s.group() as u32,
                nb: self.nb as u32,
                nsel: self.nsel as u32,
                scale_log2: scale * std::f32::consts::LOG2_E,
                q_off: w(Class::Q).skip,
                k_off: w(Class::K).skip,
                i_off: w(Class::Sel).skip,
                m_off: w(Class::Mass).skip,
                r_off: w(Class::Row).skip,
                _pad: [0; 3],
            };
            launch::dispatch(
                gpu,
                enc,
                &self.pipe,
                bytemuck::bytes_of(&p),
                &[
                    (1, q, w(Class::Q)),
                    (2, k, w(Class::K)),
                    (3, sel, w(Class::Sel)),
                    (4, &out.block_mass, w(Class::Mass)),
                    (5, &out.sparsity, w(Class::Row)),
                    (6, &out.entropy, w(Class::Row)),
                ],
                (
                    (s.seq_q as u32).div_ceil(THREADS),
                    ((c.u1 - c.u0) * s.group() as u64) as u32,
                ),
            );
        }
        Ok(())
    }

    /// Key blocks of the map.
    pub fn blocks(&self) -> usize {
        self.nb
    }

    pub fn block(&self) -> usize {
        self.block
    }
}
