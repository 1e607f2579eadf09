//! Launch plumbing shared by the ops: binding windows, splitting work across launches when
//! tensors exceed the device's storage-binding limit, and recording one dispatch.

use crate::error::invalid;
use crate::error::{Error, Result};
use crate::gpu::encoder::Bindings;
use crate::gpu::{DType, Encoder, Gpu, Pipeline, Tensor};

/// A byte window of a buffer that a binding may cover, and where the data starts inside it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Window {
    pub offset: u64,
    pub size: u64,
    /// First element of the data, counted from `offset`.
    pub skip: u32,
}

pub(crate) fn window(first_elem: u64, elems: u64, align: u64) -> Window {
    window_sized(first_elem, elems, align, 4)
}

/// [`window`] for elements of `elem` bytes (2 for f16 tensors).
pub(crate) fn window_sized(first_elem: u64, elems: u64, align: u64, elem: u64) -> Window {
    // 256 is a multiple of every device's offset alignment and keeps `skip` a multiple of 4
    // elements (the kernels read vec4) for 4- and 2-byte elements.
    let align = align.max(256);
    let start = first_elem * elem;
    let offset = start / align * align;
    Window {
        offset,
        // Bindings cover whole 4-byte words.
        size: (start + elems * elem - offset).next_multiple_of(4).max(4),
        skip: ((start - offset) / elem) as u32,
    }
}

/// One launch's share of the problem: (batch, kv-head) groups `u0..u1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Chunk {
    pub u0: u64,
    pub u1: u64,
}

crate::gpu::uniform::uniform!(
    "attn_params.wgsl",
    Params,
    /// Uniform block shared with `shaders/common.wgsl` (`Params`).
    pub(crate) struct Params {
        pub seq_q: u32,
        pub seq_k: u32,
        pub q_pos0: u32,
        pub causal: u32,
        pub group: u32,
        pub q_off: u32,
        pub k_off: u32,
        pub r_off: u32,
        pub scale_log2: f32,
        pub scale: f32,
        pub grid_x: u32,
        pub rows: u32,
        pub nsel: u32,
        pub i_off: u32,
        pub b_off: u32,
        pub _pad: u32,
    }
);

/// Split `units` work units (e.g. (batch, kv-head) groups) into chunks such that each tensor
/// class, taking `per_unit` bytes per unit, fits one storage binding, and a chunk holds at most
/// `max_units` units (the grid limit).
pub(crate) fn plan_units(
    gpu: &Gpu,
    units: u64,
    per_unit: &[(&str, u64)],
    max_units: u64,
) -> Result<Vec<Chunk>> {
    let align = gpu.limits().min_storage_buffer_offset_alignment.max(256) as u64;
    let max_bind = gpu.max_binding();
    let mut units_max = max_units;
    for &(what, bytes) in per_unit {
        let fit = max_bind.saturating_sub(align) / bytes.max(1);
        if fit == 0 {
            return Err(Error::Unsupported(format!(
                "one (batch, kv-head) slice of the {what} takes {bytes} bytes, more than this \
                 device can bind at once ({max_bind} bytes); shorten the sequence"
            )));
        }
        units_max = units_max.min(fit);
    }
    if units_max == 0 {
        return Err(Error::Unsupported(format!(
            "one work unit needs more workgroups than this device's dispatch limit of {}",
            gpu.limits().max_compute_workgroups_per_dimension
        )));
    }
    Ok((0..units.div_ceil(units_max))
        .map(|i| Chunk {
            u0: i * units_max,
            u1: ((i + 1) * units_max).min(units),
        })
        .collect())
}

/// One tensor of a launch as its kernel sees it: the shape and dtype it must have, and whether
/// the kernel writes it. Ops list their tensors once and [`check_args`] does the rest.
#[derive(Clone)]
pub(crate) struct Arg<'a> {
    name: &'a str,
    t: &'a Tensor,
    dims: &'a [usize],
    dtype: DType,
    out: bool,
}

/// A tensor the kernel reads.
pub(crate) fn input<'a>(name: &'a str, t: &'a Tensor, dims: &'a [usize], dtype: DType) -> Arg<'a> {
    Arg {
        name,
        t,
        dims,
        dtype,
        out: false,
    }
}

/// A tensor the kernel writes.
pub(crate) fn output<'a>(name: &'a str, t: &'a Tensor, dims: &'a [usize], dtype: DType) -> Arg<'a> {
    Arg {
        out: true,
        ..input(name, t, dims, dtype)
    }
}

/// Every tensor has exactly its shape and dtype, and no output shares memory with any other
/// tensor of the launch; the error names the tensor. The kernels run without bounds checks, so
/// this is what keeps their indices inside the buffers.
pub(crate) fn check_args(args: &[Arg]) -> Result<()> {
    for a in args {
        if a.t.shape() != a.dims || a.t.dtype() != a.dtype {
            invalid!(
                "{} has shape {:?} and dtype {:?}; expected shape {:?} and dtype {:?}",
                a.name,
                a.t.shape(),
                a.t.dtype(),
                a.dims,
                a.dtype
            );
        }
    }
    for (i, a) in args.iter().enumerate().filter(|(_, a)| a.out) {
        for (j, b) in args.iter().enumerate() {
            let (x, y) = (a.t.byte_range(), b.t.byte_range());
            // Each pair of outputs is reported once.
            let pair_seen = b.out && j < i;
            if i != j
                && !pair_seen
                && a.t.buffer() == b.t.buffer()
                && x.start < y.end
                && y.start < x.end
            {
                invalid!(
                    "output {} overlaps {} in memory; give each output its own",
                    a.name,
                    b.name
                );
            }
        }
    }
    Ok(())
}

/// Record one dispatch: uniform `params` at binding 0, then each tensor window at its binding.
pub(crate) fn dispatch(
    gpu: &Gpu,
    enc: &mut Encoder,
    pipe: &Pipeline,
    params: &[u8],
    views: &[(u32, &Tensor, Window)],
    grid: (u32, u32),
) {
    let uniform = gpu.uniform(params);
    // Views inside a larger buffer (Burn's pages) start at an aligned offset.
    let views: Vec<(u32, &wgpu::Buffer, u64, u64)> = views
        .iter()
        .map(|&(b, t, w)| (b, t.buffer(), t.offset() + w.offset, w.size))
        .collect();
    let b = Bindings {
        uniform: &uniform,
        views: &views,
    };
    enc.dispatch(gpu, pipe, &b, grid);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_aligned_and_cover_the_data() {
        let w = window(100, 50, 256);
        assert_eq!(w.offset, 256);
        assert_eq!(w.skip, 36);
        assert_eq!(w.offset + 4 * w.skip as u64, 400);
        assert_eq!(w.size, 400 + 200 - 256);
    }
}
