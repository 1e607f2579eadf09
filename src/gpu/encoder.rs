//! Recording GPU work. [`Encoder`] wraps a command encoder so that consecutive dispatches share
//! one compute pass: on an H200 a pass per dispatch costs ~10 us of host time to record and as
//! much again at submission, against ~2 us for a dispatch in an open pass
//! (`examples/dispatch_cost.rs`). Anything that is not a dispatch goes through [`Encoder::raw`],
//! which ends the open pass first, so the order of the recorded work is kept.
//!
//! [`BindCache`] keeps bind groups for an owner that records the same dispatches on the same
//! buffers over and over (a decoding layer, every token).

use std::collections::HashMap;
use std::num::NonZeroU64;
use std::sync::{Arc, Mutex};

use crate::gpu::{Gpu, Pipeline};

/// A command encoder whose dispatches share compute passes.
pub struct Encoder {
    // Declared first so that it ends before the encoder it locks goes.
    pass: Option<wgpu::ComputePass<'static>>,
    enc: wgpu::CommandEncoder,
    binds: Option<BindCache>,
}

/// One dispatch's bindings: the uniform at binding 0, then (binding, buffer, byte offset, byte
/// size) of every storage view.
pub(crate) struct Bindings<'a> {
    pub uniform: &'a wgpu::Buffer,
    pub views: &'a [(u32, &'a wgpu::Buffer, u64, u64)],
}

impl Encoder {
    pub fn new(device: &wgpu::Device) -> Self {
        Self {
            pass: None,
            enc: device.create_command_encoder(&Default::default()),
            binds: None,
        }
    }

    /// The command encoder itself, for copies, queries and passes of one's own: the open
    /// compute pass ends here.
    pub fn raw(&mut self) -> &mut wgpu::CommandEncoder {
        self.pass = None;
        &mut self.enc
    }

    /// End the recording.
    pub fn finish(mut self) -> wgpu::CommandBuffer {
        self.pass = None;
        self.enc.finish()
    }

    /// End the recording so far and go on in a fresh encoder (same bind cache): for a step
    /// that must submit part of its work and wait before recording the rest.
    pub fn split(&mut self, device: &wgpu::Device) -> wgpu::CommandBuffer {
        self.pass = None;
        std::mem::replace(
            &mut self.enc,
            device.create_command_encoder(&Default::default()),
        )
        .finish()
    }

    /// Run `f` with the dispatches it records taking their bind groups from `binds`.
    pub(crate) fn keeping<R>(&mut self, binds: &BindCache, f: impl FnOnce(&mut Self) -> R) -> R {
        let before = self.binds.replace(binds.clone());
        let r = f(self);
        self.binds = before;
        r
    }

    /// Record one dispatch of `pipe` over `grid` workgroups. A profiled dispatch (timestamps
    /// from `Gpu::profile`) gets a pass of its own.
    pub(crate) fn dispatch(&mut self, gpu: &Gpu, pipe: &Pipeline, b: &Bindings, grid: (u32, u32)) {
        let bg = match &self.binds {
            Some(cache) => cache.get(gpu, pipe, b),
            None => make_bind_group(gpu, pipe, b),
        };
        let timed = gpu.profile_slot(&pipe.label);
        if timed.is_some() || self.pass.is_none() {
            self.pass = None;
            self.open(
                timed
                    .as_ref()
                    .map(|(set, i)| wgpu::ComputePassTimestampWrites {
                        query_set: set,
                        beginning_of_pass_write_index: Some(*i),
                        end_of_pass_write_index: Some(*i + 1),
                    }),
            );
        }
        let pass = self.pass.as_mut().expect("a pass was opened above");
        pass.set_pipeline(&pipe.pipeline);
        pass.set_bind_group(0, &bg, &[]);
        pass.dispatch_workgroups(grid.0, grid.1, 1);
        if timed.is_some() {
            // The next dispatch must not land between this one's timestamps.
            self.pass = None;
        }
    }

    fn open(&mut self, timestamp_writes: Option<wgpu::ComputePassTimestampWrites>) {
        self.pass = Some(
            self.enc
                .begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: None,
                    timestamp_writes,
                })
                .forget_lifetime(),
        );
    }
}

fn make_bind_group(gpu: &Gpu, pipe: &Pipeline, b: &Bindings) -> wgpu::BindGroup {
    let mut entries = vec![wgpu::BindGroupEntry {
        binding: 0,
        resource: b.uniform.as_entire_binding(),
    }];
    for &(binding, buffer, offset, size) in b.views {
        entries.push(wgpu::BindGroupEntry {
            binding,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer,
                offset,
                size: NonZeroU64::new(size),
            }),
        });
    }
    gpu.device().create_bind_group(&wgpu::BindGroupDescriptor {
        label: None,
        layout: &pipe.layout,
        entries: &entries,
    })
}

/// Bind groups kept by pipeline, uniform and buffer windows. It holds their buffers alive, so
/// it belongs to the owner of those buffers and goes with it; it forgets everything when it
/// grows past [`BindCache::KEPT`] (an owner whose inputs change every call).
#[derive(Clone, Default)]
pub(crate) struct BindCache(Arc<Mutex<HashMap<BindKey, wgpu::BindGroup>>>);

#[derive(PartialEq, Eq, Hash)]
struct BindKey {
    pipeline: wgpu::ComputePipeline,
    uniform: wgpu::Buffer,
    views: Vec<(u32, wgpu::Buffer, u64, u64)>,
}

impl BindCache {
    /// Bind groups kept at most (a decoding layer records about ten per step shape).
    pub const KEPT: usize = 256;

    fn get(&self, gpu: &Gpu, pipe: &Pipeline, b: &Bindings) -> wgpu::BindGroup {
        let key = BindKey {
            pipeline: pipe.pipeline.clone(),
            uniform: b.uniform.clone(),
            views: b
                .views
                .iter()
                .map(|&(i, buf, o, n)| (i, buf.clone(), o, n))
                .collect(),
        };
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(bg) = map.get(&key) {
            return bg.clone();
        }
        if map.len() >= Self::KEPT {
            map.clear();
        }
        map.entry(key)
            .or_insert_with(|| make_bind_group(gpu, pipe, b))
            .clone()
    }

    /// Bind groups kept now.
    pub fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}
