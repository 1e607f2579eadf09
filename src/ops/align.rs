//! SSA's alignment loss and its gradients on the GPU (`shaders/align.wgsl`): one pass over
//! h_full and h_sparse writes both gradients and per-workgroup partial sums, a second tiny pass
//! sums the partials in a fixed order (deterministic). Reference: `reference::align`.

use crate::gpu::Encoder;
use std::sync::Arc;

use crate::error::{Result, invalid};
use crate::gpu::{DType, Gpu, Pipeline, PipelineKey, Tensor};
use crate::ops::launch::{self, check_args, input, output, window};

const NT: u32 = 256;
/// Elements per workgroup (each thread sums PER / NT of them before the tree).
const PER: u64 = 4096;

crate::gpu::uniform::uniform!(
    "align.wgsl",
    AlignParams,
    pub(crate) struct Params {
        pub count: u32,
        pub grid_x: u32,
        pub skip: u32,
        pub part0: u32,
        pub parts: u32,
        pub beta: f32,
        pub inv_beta: f32,
        pub scale_n: f32,
        pub loss_n: f32,
        pub _pad: [u32; 3],
    }
);

/// The loss (a one-element tensor) and the gradients, shaped like the inputs.
#[derive(Debug)]
pub struct AlignOut {
    pub loss: Tensor,
    pub g_full: Tensor,
    pub g_sparse: Tensor,
}

impl AlignOut {
    pub fn empty(gpu: &Gpu, dims: &[usize]) -> Result<Self> {
        Ok(Self {
            loss: gpu.empty(&[1], DType::F32)?,
            g_full: gpu.empty(dims, DType::F32)?,
            g_sparse: gpu.empty(dims, DType::F32)?,
        })
    }
}

/// The alignment loss for tensors of one shape (e.g. `[batch, heads, seq, head_dim]`).
#[derive(Debug)]
pub struct AlignLoss {
    dims: Vec<usize>,
    n: u64,
    beta: f32,
    /// (first element, elements) of each launch: a launch stays within one storage binding.
    launches: Vec<(u64, u64)>,
    parts: u64,
    partials: Tensor,
    align: Arc<Pipeline>,
    finalize: Arc<Pipeline>,
}

impl AlignLoss {
    /// `beta`: SmoothL1's threshold (SSA uses 1).
    pub fn new(gpu: &Gpu, dims: &[usize], beta: f32) -> Result<Self> {
        let n: u64 = dims.iter().map(|&d| d as u64).product();
        if dims.is_empty() || n == 0 {
            invalid!("the alignment loss needs non-empty tensors, got shape {dims:?}");
        }
        if beta.is_nan() || beta <= 0.0 || beta.is_infinite() {
            invalid!("SmoothL1 beta must be positive and finite, got {beta}");
        }
        if n > u32::MAX as u64 / 2 {
            invalid!("{n} elements exceed the alignment kernel's 2^31 limit; split the tensor");
        }
        let max_x = gpu.limits().max_compute_workgroups_per_dimension as u64;
        let per_launch = ((gpu.max_binding() - 256) / 4 / PER * PER).min(max_x * max_x * PER);
        let mut launches = Vec::new();
        let mut first = 0;
        while first < n {
            let count = per_launch.min(n - first);
            launches.push((first, count));
            first += count;
        }
        let parts: u64 = launches.iter().map(|&(_, c)| c.div_ceil(PER)).sum();
        let key = |entry| PipelineKey {
            file: "align.wgsl",
            entry,
            constants: vec![("NT", NT), ("PER", PER as u32)],
            checked: false,
            storage: crate::gpu::Storage::F32,
        };
        Ok(Self {
            dims: dims.to_vec(),
            n,
            beta,
            launches,
            parts,
            partials: gpu.empty(&[parts as usize], DType::F32)?,
            align: gpu.pipeline(&key("align"))?,
            finalize: gpu.pipeline(&key("finalize"))?,
        })
    }

    /// Launches per call (more than one past the device's storage-binding limit).
    pub fn launches(&self) -> usize {
        self.launches.len()
    }

    /// Record: loss = L, g_full = scale·dL/dh_full, g_sparse = scale·dL/dh_sparse.
    pub fn encode(
        &self,
        gpu: &Gpu,
        enc: &mut Encoder,
        h_full: &Tensor,
        h_sparse: &Tensor,
        scale: f32,
        out: &AlignOut,
    ) -> Result<()> {
        let d = &self.dims;
        check_args(&[
            input("h_full", h_full, d, DType::F32),
            input("h_sparse", h_sparse, d, DType::F32),
            output("loss", &out.loss, &[1], DType::F32),
            output("g_full", &out.g_full, d, DType::F32),
            output("g_sparse", &out.g_sparse, d, DType::F32),
        ])?;
        if !scale.is_finite() {
            invalid!("the gradient scale must be finite, got {scale}");
        }
        let max_x = gpu.limits().max_compute_workgroups_per_dimension as u64;
        let align = gpu.limits().min_storage_buffer_offset_alignment as u64;
        let base = Params {
            count: 0,
            grid_x: 0,
            skip: 0,
            part0: 0,
            parts: self.parts as u32,
            beta: self.beta,
            inv_beta: 1.0 / self.beta,
            scale_n: scale / self.n as f32,
            loss_n: 2.0 / self.n as f32,
            _pad: [0; 3],
        };
        let all = window(0, self.parts, align);
        let mut part0 = 0;
        for &(first, count) in &self.launches {
            let w = window(first, count, align);
            let blocks = count.div_ceil(PER);
            let gx = blocks.min(max_x);
            let p = Params {
                count: count as u32,
                grid_x: gx as u32,
                skip: w.skip,
                part0: part0 as u32,
                ..base
            };
            launch::dispatch(
                gpu,
                enc,
                &self.align,
                bytemuck::bytes_of(&p),
                &[
                    (1, h_full, w),
                    (2, h_sparse, w),
                    (3, &out.g_full, w),
                    (4, &out.g_sparse, w),
                    (5, &self.partials, all),
                ],
                (gx as u32, blocks.div_ceil(gx) as u32),
            );
            part0 += blocks;
        }
        launch::dispatch(
            gpu,
            enc,
            &self.finalize,
            bytemuck::bytes_of(&base),
            &[
                (5, &self.partials, all),
                (6, &out.loss, window(0, 1, align)),
            ],
            (1, 1),
        );
        Ok(())
    }

    /// Run it and return new output tensors.
    pub fn compute(
        &self,
        gpu: &Gpu,
        h_full: &Tensor,
        h_sparse: &Tensor,
        scale: f32,
    ) -> Result<AlignOut> {
        let out = AlignOut::empty(gpu, &self.dims)?;
        let mut enc = gpu.encoder();
        self.encode(gpu, &mut enc, h_full, h_sparse, scale, &out)?;
        gpu.scoped("alignment loss", || gpu.queue().submit([enc.finish()]))?;
        Ok(out)
    }
}
