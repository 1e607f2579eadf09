//! D = rowsum(dO ∘ O) (`shaders/rowdot.wgsl`): the first step of the dense and the sparse
//! backward, one thread per query row. The callers own the chunking: they pass the launch's
//! parameters and the windows of O, dO and D.

use crate::gpu::Encoder;
use std::sync::Arc;

use crate::error::Result;
use crate::gpu::{Gpu, Pipeline, PipelineKey, Storage, Tensor};
use crate::ops::launch::{self, Params, Window};

/// Rows per workgroup: the kernel is bound by memory, any width does.
const NT: u32 = 64;

#[derive(Debug)]
pub(crate) struct RowDot {
    pipe: Arc<Pipeline>,
}

impl RowDot {
    pub(crate) fn new(gpu: &Gpu, storage: Storage, head_dim: usize) -> Result<Self> {
        let pipe = gpu.pipeline(&PipelineKey {
            file: "rowdot.wgsl",
            entry: "main",
            constants: vec![("D", head_dim as u32), ("NT", NT), ("BQ", NT)],
            checked: false,
            storage,
        })?;
        Ok(Self { pipe })
    }

    /// Record D for `rows` rows. `base` carries the launch's offsets (`q_off`, `r_off`);
    /// `o`, `d_o` and `rowd` are the chunk's windows (validated by the caller's checks).
    pub(crate) fn encode(
        &self,
        gpu: &Gpu,
        enc: &mut Encoder,
        base: &Params,
        rows: u32,
        [o, d_o, rowd]: [(&Tensor, Window); 3],
    ) {
        let blocks = rows.div_ceil(NT);
        let gx = blocks.min(gpu.limits().max_compute_workgroups_per_dimension);
        let p = Params {
            grid_x: gx,
            rows,
            ..*base
        };
        launch::dispatch(
            gpu,
            enc,
            &self.pipe,
            bytemuck::bytes_of(&p),
            &[(1, o.0, o.1), (2, d_o.0, d_o.1), (3, rowd.0, rowd.1)],
            (gx, blocks.div_ceil(gx)),
        );
    }
}
