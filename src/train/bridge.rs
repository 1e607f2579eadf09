//! One wgpu device shared by Burn and our kernels.
//!
//! We open the device (our adapter choice, features and limits), hand the same instance,
//! adapter, device and queue to Burn's wgpu runtime, and remember which `Gpu` belongs to which
//! Burn device. Inside an op, a Burn tensor's memory is a range of a pooled wgpu buffer: we bind
//! that range directly ([`Tensor::view`]), after Burn has submitted the work queued before it, so
//! a training step never leaves the GPU.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use burn::backend::wgpu::{AutoCompiler, CubeTensor, WgpuDevice, WgpuSetup};
use burn::tensor::{DType as BurnDType, Device, Shape};
use cubecl::wgpu::WgpuServer;

use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, GpuOptions, Tensor};
use crate::ops::align::AlignLoss;
use crate::ops::metrics::AttentionMetrics;
use crate::problem::{AttnShape, SparseOptions};
use crate::{BlockSelect, FullAttention, FullConfig, SelectConfig, SparseAttention, SparseConfig};

/// A device shared with Burn: our runtime and the op objects built on it.
pub(crate) struct Shared {
    pub gpu: Arc<Gpu>,
    ops: Mutex<OpCache>,
}

/// Op objects per (shape, config), built once: a training step validates its tensors and
/// records dispatches, but builds no op and compiles nothing. Few distinct shapes occur in one
/// run (one per layer kind and sequence length), so a list searched in order is enough; it is
/// capped so that a caller sweeping shapes cannot grow it without bound.
#[derive(Default)]
struct OpCache {
    full: Cache<(AttnShape, FullConfig), FullAttention>,
    select: Cache<(AttnShape, SelectConfig), BlockSelect>,
    sparse: Cache<(AttnShape, SparseConfig), SparseAttention>,
    /// Keyed by the tensor dims and beta's bits.
    align: Cache<(Vec<usize>, u32), AlignLoss>,
    /// Keyed by shape, options and selection width.
    metrics: Cache<(AttnShape, SparseOptions, usize), AttentionMetrics>,
}

type Cache<K, T> = Vec<(K, Arc<T>)>;

const OPS_PER_KIND: usize = 64;

fn cached<K: PartialEq, T>(
    list: &mut Vec<(K, Arc<T>)>,
    key: K,
    make: impl FnOnce() -> Result<T>,
) -> Result<Arc<T>> {
    if let Some((_, op)) = list.iter().find(|(k, _)| *k == key) {
        return Ok(op.clone());
    }
    let op = Arc::new(make()?);
    if list.len() >= OPS_PER_KIND {
        list.remove(0);
    }
    list.push((key, op.clone()));
    Ok(op)
}

impl Shared {
    fn ops(&self) -> std::sync::MutexGuard<'_, OpCache> {
        self.ops.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn full(&self, s: AttnShape, c: FullConfig) -> Result<Arc<FullAttention>> {
        cached(&mut self.ops().full, (s, c), || {
            FullAttention::new(&self.gpu, s, &c)
        })
    }

    pub(crate) fn select(&self, s: AttnShape, c: SelectConfig) -> Result<Arc<BlockSelect>> {
        cached(&mut self.ops().select, (s, c), || {
            BlockSelect::new(&self.gpu, s, &c)
        })
    }

    pub(crate) fn sparse(&self, s: AttnShape, c: SparseConfig) -> Result<Arc<SparseAttention>> {
        cached(&mut self.ops().sparse, (s, c), || {
            SparseAttention::new(&self.gpu, s, &c)
        })
    }

    pub(crate) fn align(&self, dims: &[usize], beta: f32) -> Result<Arc<AlignLoss>> {
        cached(
            &mut self.ops().align,
            (dims.to_vec(), beta.to_bits()),
            || AlignLoss::new(&self.gpu, dims, beta),
        )
    }

    pub(crate) fn metrics(
        &self,
        s: AttnShape,
        o: SparseOptions,
        nsel: usize,
    ) -> Result<Arc<AttentionMetrics>> {
        cached(&mut self.ops().metrics, (s, o, nsel), || {
            AttentionMetrics::new(&self.gpu, s, o, nsel)
        })
    }
}

impl Drop for Runtime {
    /// Wait for Burn's queued work: a process that exits with work still queued (an error
    /// returned right after loading a model) was killed by a segfault in the driver's teardown
    /// on the H200.
    fn drop(&mut self) {
        if let Err(e) = self.device.sync() {
            log::warn!("waiting for Burn's queued work: {e:?}");
        }
    }
}

type Registry = Mutex<HashMap<WgpuDevice, Arc<Shared>>>;

fn registry() -> &'static Registry {
    static REG: OnceLock<Registry> = OnceLock::new();
    REG.get_or_init(Default::default)
}

/// Our runtime and the Burn device that shares it.
#[derive(Clone, Debug)]
pub struct Runtime {
    pub gpu: Arc<Gpu>,
    /// Burn's device (without autodiff; use `.autodiff()` for training).
    pub device: Device,
}

impl Runtime {
    /// Open a device as `Gpu::new` does, with every adapter feature (Burn's kernels use what
    /// the adapter offers), and register it with Burn.
    pub fn new(options: &GpuOptions) -> Result<Self> {
        Self::from_gpu(Arc::new(Gpu::new(&Self::gpu_options(options))?))
    }

    /// `options` as Burn needs them: every feature of the adapter requested.
    pub fn gpu_options(options: &GpuOptions) -> GpuOptions {
        GpuOptions {
            all_features: true,
            portable_only: false,
            ..options.clone()
        }
    }

    /// Register an open `Gpu` with Burn. It must have been opened with
    /// [`Runtime::gpu_options`] (Burn's kernels assume the adapter's features). Each call makes
    /// a new Burn runtime: call it once per device and clone the result.
    pub fn from_gpu(gpu: Arc<Gpu>) -> Result<Self> {
        let want = gpu.wgpu_adapter().features() - wgpu::Features::MAPPABLE_PRIMARY_BUFFERS;
        let missing = want - gpu.device().features();
        if !missing.is_empty() {
            return Err(Error::Unsupported(format!(
                "Burn's kernels use every feature the adapter offers, but this device was opened \
                 without {missing:?}; open it with train::Runtime::gpu_options(..)"
            )));
        }
        // Burn packs many tensors into one buffer: inputs and outputs of one dispatch may share it.
        gpu.set_pooled_buffers(true);
        let setup = WgpuSetup {
            instance: gpu.instance().clone(),
            adapter: gpu.wgpu_adapter().clone(),
            device: gpu.device().clone(),
            queue: gpu.queue().clone(),
            backend: gpu.adapter().backend,
        };
        let device = Device::wgpu_options()
            .setup(setup)
            .init()
            .map_err(|e| Error::Gpu(format!("Burn could not use this device: {e}")))?;
        let wgpu_device = wgpu_device_of(&device).ok_or_else(|| {
            Error::Gpu("Burn returned a device that is not a wgpu device".to_string())
        })?;
        registry().lock().expect("registry").insert(
            wgpu_device,
            Arc::new(Shared {
                gpu: gpu.clone(),
                ops: Mutex::default(),
            }),
        );
        Ok(Self { gpu, device })
    }
}

fn wgpu_device_of(device: &Device) -> Option<WgpuDevice> {
    use burn::backend::DispatchDevice;
    match device.clone().inner().as_dispatch() {
        DispatchDevice::Cube(cubecl::Device::Wgpu(w)) => Some(w.clone()),
        _ => None,
    }
}

/// The `Gpu` registered for a Burn device (with or without autodiff).
pub fn gpu_for(device: &Device) -> Result<Arc<Gpu>> {
    Ok(shared_for(device)?.gpu.clone())
}

/// The shared device (runtime and op cache) registered for a Burn device.
pub(crate) fn shared_for(device: &Device) -> Result<Arc<Shared>> {
    let w = wgpu_device_of(device).ok_or_else(|| {
        Error::Unsupported(format!(
            "sparse-attn's Burn ops run on the wgpu device made by train::Runtime, not on {device:?}"
        ))
    })?;
    registry()
        .lock()
        .expect("registry")
        .get(&w)
        .cloned()
        .ok_or_else(|| {
            Error::Unsupported(
                "this Burn wgpu device was not opened through sparse_attn::train::Runtime, so \
                 our kernels cannot reach its buffers"
                    .to_string(),
            )
        })
}

/// The shared device of a tensor inside an op. The public wrappers have checked it already.
pub(crate) fn shared_of(t: &CubeTensor) -> Arc<Shared> {
    let cubecl::Device::Wgpu(w) = &t.device else {
        panic!("sparse-attn ops run on wgpu devices only");
    };
    registry()
        .lock()
        .expect("registry")
        .get(w)
        .cloned()
        .expect("device registered (checked by the public wrapper)")
}

/// A Burn tensor's memory seen as one of our tensors, pinned while this lives.
pub(crate) struct Bound {
    pub tensor: Tensor,
    /// Burn's guard of the allocation (cubecl's `ManagedResource`): while it lives the memory is
    /// neither freed nor handed out again.
    _pin: Box<dyn std::any::Any>,
}

pub(crate) fn dtype_of(t: &CubeTensor) -> DType {
    match t.dtype {
        BurnDType::F32 => DType::F32,
        BurnDType::F16 => DType::F16,
        BurnDType::U32 | BurnDType::I32 => DType::U32,
        other => panic!("sparse-attn ops take f32 or f16 tensors and u32 indices, got {other:?}"),
    }
}

/// Bytes of `n` elements of `dtype`, in whole 4-byte words (copies and our views move words).
fn words_bytes(n: usize, dtype: BurnDType) -> usize {
    (n.max(1) * dtype.size()).next_multiple_of(4)
}

/// Bind a (made contiguous) Burn tensor. A range that does not start at the device's storage
/// alignment (a slice of a larger tensor) is copied to a fresh allocation first.
pub(crate) fn bind(gpu: &Gpu, t: CubeTensor) -> (Bound, CubeTensor) {
    let t = burn::backend::wgpu::into_contiguous(t);
    let dims: Vec<usize> = t.meta.shape().iter().copied().collect();
    let dtype = dtype_of(&t);
    let pin = t
        .client
        .get_resource::<WgpuServer<AutoCompiler>>(t.handle.clone())
        .expect("Burn tensor resource");
    let r = pin.resource();
    let align = gpu.limits().min_storage_buffer_offset_alignment as u64;
    if r.offset.is_multiple_of(align.max(4)) {
        let tensor = Tensor::view(gpu, r.buffer.clone(), r.offset, &dims, dtype)
            .expect("a Burn allocation is a valid view");
        return (
            Bound {
                tensor,
                _pin: Box::new(pin),
            },
            t,
        );
    }
    // Unaligned: copy into a new allocation (Burn's allocations are aligned).
    let bytes = words_bytes(dims.iter().product::<usize>(), t.dtype);
    let fresh = alloc(gpu, &t, &dims, t.dtype);
    let (dst, fresh) = bind(gpu, fresh);
    flush(&t);
    let mut enc = gpu.device().create_command_encoder(&Default::default());
    enc.copy_buffer_to_buffer(
        &r.buffer,
        r.offset,
        dst.tensor.buffer(),
        dst.tensor.offset(),
        bytes as u64,
    );
    gpu.queue().submit([enc.finish()]);
    (dst, fresh)
}

/// A new contiguous Burn tensor on `like`'s device.
pub(crate) fn alloc(_gpu: &Gpu, like: &CubeTensor, dims: &[usize], dtype: BurnDType) -> CubeTensor {
    let handle = like.client.empty(words_bytes(dims.iter().product(), dtype));
    CubeTensor::new_contiguous(
        like.client.clone(),
        like.device.clone(),
        Shape::from(dims.to_vec()),
        handle,
        dtype,
    )
}

/// Submit the work Burn has queued, so that ours (submitted next on the same queue) runs after.
pub(crate) fn flush(t: &CubeTensor) {
    t.client.flush().expect("flushing Burn's queued work");
}
