//! A typed GPU tensor: one storage buffer, a shape, a dtype. Upload and readback.

use std::sync::{Arc, Mutex};

use crate::error::{Error, Result, invalid};
use crate::gpu::Gpu;

/// Element type of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    /// IEEE half precision: storage of the f16 kernels (they accumulate in f32). Host data goes
    /// in and out as f32 (rounded to nearest on the way in, widened exactly on the way out).
    F16,
    /// Indices (block selections).
    U32,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::U32 => 4,
            DType::F16 => 2,
        }
    }
}

/// Row-major contiguous tensor on the GPU: `len` elements from byte `offset` of `buffer`.
///
/// Tensors made here own their buffer (offset 0); `Tensor::view` wraps memory someone else owns,
/// such as one allocation inside a Burn memory page.
#[derive(Debug, Clone)]
pub struct Tensor {
    pub(crate) buffer: wgpu::Buffer,
    offset: u64,
    shape: Vec<usize>,
    dtype: DType,
}

impl Tensor {
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn size_bytes(&self) -> u64 {
        (self.len() * self.dtype.size()) as u64
    }
    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.buffer
    }
    /// Byte offset of the first element inside `buffer()`.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// A tensor over `shape` elements of `dtype` starting at byte `offset` of `buffer`. The range
    /// must lie inside the buffer and the offset must meet the device's storage-binding alignment
    /// (the launchers bind windows relative to it); the buffer needs STORAGE usage, and
    /// COPY_SRC / COPY_DST for readback / writes.
    pub fn view(
        gpu: &Gpu,
        buffer: wgpu::Buffer,
        offset: u64,
        shape: &[usize],
        dtype: DType,
    ) -> Result<Tensor> {
        let (_, bytes) = checked_len(shape, dtype)?;
        let align = gpu.limits().min_storage_buffer_offset_alignment as u64;
        if !offset.is_multiple_of(align.max(4)) {
            invalid!(
                "a tensor view must start at a multiple of {} bytes (the device's storage \
                 alignment); offset {offset} does not",
                align.max(4)
            );
        }
        if !buffer.usage().contains(wgpu::BufferUsages::STORAGE) {
            invalid!("a tensor view needs a buffer with STORAGE usage");
        }
        match offset.checked_add(bytes) {
            Some(end) if end <= buffer.size() => {}
            _ => invalid!(
                "a tensor view of shape {shape:?} ({bytes} bytes at offset {offset}) does not fit \
                 its buffer of {} bytes",
                buffer.size()
            ),
        }
        Ok(Tensor {
            buffer,
            offset,
            shape: shape.to_vec(),
            dtype,
        })
    }

    /// Byte range this tensor occupies in its buffer.
    pub(crate) fn byte_range(&self) -> std::ops::Range<u64> {
        self.offset..self.offset + self.size_bytes()
    }

    /// Same memory, another shape with as many elements.
    pub fn reshaped(&self, shape: &[usize]) -> Result<Tensor> {
        let (len, _) = checked_len(shape, self.dtype)?;
        if len != self.len() {
            invalid!(
                "cannot view {:?} ({} elements) as {shape:?} ({len} elements)",
                self.shape,
                self.len()
            );
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            ..self.clone()
        })
    }
}

/// f32 values rounded to f16 bit patterns (nearest even).
pub fn to_f16_bits(data: &[f32]) -> Vec<u16> {
    data.iter()
        .map(|&x| half::f16::from_f32(x).to_bits())
        .collect()
}

/// f16 bit patterns widened to f32 (exact).
pub fn from_f16_bits(bits: &[u16]) -> Vec<f32> {
    bits.iter()
        .map(|&b| half::f16::from_bits(b).to_f32())
        .collect()
}

/// Each value rounded to the nearest f16 and back: what an f16 tensor of `data` holds.
pub fn round_f16(data: &[f32]) -> Vec<f32> {
    from_f16_bits(&to_f16_bits(data))
}

fn checked_len(shape: &[usize], dtype: DType) -> Result<(usize, u64)> {
    let len = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| Error::InvalidInput(format!("shape {shape:?} overflows")))?;
    let bytes = (len as u64)
        .checked_mul(dtype.size() as u64)
        .ok_or_else(|| Error::InvalidInput(format!("shape {shape:?} overflows")))?;
    Ok((len, bytes))
}

impl Gpu {
    /// A tensor with undefined contents (kernels overwrite it).
    pub fn empty(&self, shape: &[usize], dtype: DType) -> Result<Tensor> {
        self.alloc(shape, dtype, wgpu::BufferUsages::empty(), "tensor")
    }

    /// A tensor in host memory that kernels read and write in place (over the bus on a
    /// discrete GPU): a storage buffer with MAP_READ, which wgpu places in host-cached system
    /// memory. Needs a device opened with [`crate::GpuOptions::host_memory`] on an adapter with
    /// `MAPPABLE_PRIMARY_BUFFERS` (native Vulkan, Metal, DX12; not the browser).
    pub fn empty_host(&self, shape: &[usize], dtype: DType) -> Result<Tensor> {
        if !self.has_host_memory() {
            return Err(Error::Unsupported(
                "tensors in host memory need MAPPABLE_PRIMARY_BUFFERS: open the device with \
                 GpuOptions::host_memory on a native adapter that has it"
                    .into(),
            ));
        }
        self.alloc(shape, dtype, wgpu::BufferUsages::MAP_READ, "host tensor")
    }

    /// A storage buffer (copyable both ways, plus `extra` usages) for a tensor of `shape`.
    fn alloc(
        &self,
        shape: &[usize],
        dtype: DType,
        extra: wgpu::BufferUsages,
        what: &'static str,
    ) -> Result<Tensor> {
        let (_, bytes) = checked_len(shape, dtype)?;
        let max = self.limits().max_buffer_size;
        if bytes > max {
            return Err(Error::Unsupported(format!(
                "{what} of shape {shape:?} needs {bytes} bytes; this device allows buffers of at \
                 most {max} bytes"
            )));
        }
        // Zero-sized buffers are legal in wgpu but cannot be bound: keep at least one element.
        let size = bytes.max(4).next_multiple_of(4);
        let buffer = self.scoped(&format!("allocating a {what}"), || {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(what),
                size,
                usage: wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_SRC
                    | wgpu::BufferUsages::COPY_DST
                    | extra,
                mapped_at_creation: false,
            })
        })?;
        Ok(Tensor {
            buffer,
            offset: 0,
            shape: shape.to_vec(),
            dtype,
        })
    }

    /// Does this device make tensors in host memory ([`Gpu::empty_host`])?
    pub fn has_host_memory(&self) -> bool {
        self.features()
            .contains(wgpu::Features::MAPPABLE_PRIMARY_BUFFERS)
    }

    /// Upload f32 data of the given shape.
    pub fn upload(&self, shape: &[usize], data: &[f32]) -> Result<Tensor> {
        self.upload_raw(shape, DType::F32, bytemuck::cast_slice(data), data.len())
    }

    /// Upload f32 data as f16 (rounded to nearest even; beyond ±65504 becomes ±inf).
    pub fn upload_f16(&self, shape: &[usize], data: &[f32]) -> Result<Tensor> {
        let h = to_f16_bits(data);
        self.upload_raw(shape, DType::F16, bytemuck::cast_slice(&h), data.len())
    }

    /// Upload f32 data as a tensor of `dtype` (F32 or F16).
    pub fn upload_as(&self, shape: &[usize], data: &[f32], dtype: DType) -> Result<Tensor> {
        match dtype {
            DType::F32 => self.upload(shape, data),
            DType::F16 => self.upload_f16(shape, data),
            DType::U32 => invalid!("upload_as() takes F32 or F16, not U32 (use upload_u32)"),
        }
    }

    /// Upload u32 data (indices) of the given shape.
    pub fn upload_u32(&self, shape: &[usize], data: &[u32]) -> Result<Tensor> {
        self.upload_raw(shape, DType::U32, bytemuck::cast_slice(data), data.len())
    }

    fn upload_raw(&self, shape: &[usize], dtype: DType, bytes: &[u8], n: usize) -> Result<Tensor> {
        let (len, _) = checked_len(shape, dtype)?;
        if len != n {
            invalid!("shape {shape:?} holds {len} elements but {n} were given");
        }
        // `empty` rounds the buffer up to whole 4-byte words, so the pad always fits.
        let t = self.empty(shape, dtype)?;
        self.write_words(&t, bytes)?;
        Ok(t)
    }

    /// Write `bytes` at the tensor's start. wgpu moves whole 4-byte words: a ragged tail (an
    /// odd-length f16 tensor) is padded with zeros into the buffer's slack, where there is some.
    fn write_words(&self, t: &Tensor, bytes: &[u8]) -> Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        if bytes.len().is_multiple_of(4) {
            self.queue.write_buffer(&t.buffer, t.offset, bytes);
            return Ok(());
        }
        let words = bytes.len().next_multiple_of(4);
        if t.offset + words as u64 > t.buffer.size() {
            invalid!(
                "a {:?} tensor of {} bytes ending its buffer cannot be written (writes move \
                 whole 4-byte words)",
                t.dtype,
                bytes.len()
            );
        }
        let mut padded = bytes.to_vec();
        padded.resize(words, 0);
        self.queue.write_buffer(&t.buffer, t.offset, &padded);
        Ok(())
    }

    /// Overwrite a u32 tensor's contents from the host.
    pub fn write_u32(&self, t: &Tensor, data: &[u32]) -> Result<()> {
        if t.dtype != DType::U32 || t.len() != data.len() {
            invalid!(
                "writing {} u32 values into a {:?} tensor of shape {:?}",
                data.len(),
                t.dtype,
                t.shape
            );
        }
        self.write_words(t, bytemuck::cast_slice(data))
    }

    /// Overwrite a tensor's contents from the host (f32 values; an F16 tensor gets them rounded).
    pub fn write(&self, t: &Tensor, data: &[f32]) -> Result<()> {
        if t.dtype == DType::U32 || t.len() != data.len() {
            invalid!(
                "writing {} f32 values into a {:?} tensor of shape {:?}",
                data.len(),
                t.dtype,
                t.shape
            );
        }
        if t.dtype == DType::F16 {
            self.write_words(t, bytemuck::cast_slice(&to_f16_bits(data)))
        } else {
            self.write_words(t, bytemuck::cast_slice(data))
        }
    }

    /// Fill every element with one value (tests poison outputs with NaN this way).
    pub fn fill(&self, t: &Tensor, value: f32) -> Result<()> {
        self.write(t, &vec![value; t.len()])
    }

    /// Map a MAP_READ buffer whose copy has been submitted, wait, and return its bytes.
    #[cfg(not(target_arch = "wasm32"))]
    pub(crate) fn read_mapped(&self, buf: &wgpu::Buffer, what: &str) -> Result<Vec<u8>> {
        // Natively the async path waits for the GPU before awaiting, so this never parks.
        pollster::block_on(self.read_mapped_async(buf, what))
    }

    /// Map a MAP_READ buffer whose copy has been submitted and return its bytes, without
    /// blocking: in the browser the mapping completes on the event loop, which a blocking wait
    /// would never let run. Natively it waits for the GPU first, so the future is ready at once.
    pub(crate) async fn read_mapped_async(
        &self,
        buf: &wgpu::Buffer,
        what: &str,
    ) -> Result<Vec<u8>> {
        let slot: Arc<Mutex<Delivery>> = Arc::default();
        let s = slot.clone();
        buf.map_async(wgpu::MapMode::Read, .., move |r| {
            let mut d = s.lock().expect("delivery");
            d.result = Some(r.map_err(|e| e.to_string()));
            if let Some(w) = d.waker.take() {
                w.wake();
            }
        });
        #[cfg(not(target_arch = "wasm32"))]
        self.wait()?;
        Delivered(slot)
            .await
            .map_err(|e| Error::Gpu(format!("{what}: mapping failed: {e}")))?;
        #[cfg(target_arch = "wasm32")]
        self.check_errors()?;
        let bytes = buf
            .get_mapped_range(..)
            .map_err(|e| Error::Gpu(format!("{what}: reading the mapping failed: {e}")))?
            .to_vec();
        buf.unmap();
        Ok(bytes)
    }

    /// The elements of `t`, which must have dtype `want` (`what` names the caller in errors).
    async fn read_typed<T: bytemuck::Pod>(
        &self,
        t: &Tensor,
        want: DType,
        what: &str,
    ) -> Result<Vec<T>> {
        if t.dtype() != want {
            invalid!(
                "{what} wants a {want:?} tensor, this one is {:?}",
                t.dtype()
            );
        }
        if t.is_empty() {
            return Ok(Vec::new());
        }
        // Copies move whole 4-byte words: an odd-length f16 tensor brings its pad along.
        let size = t.size_bytes().next_multiple_of(4);
        if t.offset + size > t.buffer.size() {
            invalid!(
                "{what}: an f16 tensor with an odd length at the end of its buffer cannot be read"
            );
        }
        let staging = self.readback_copy(t, size);
        let bytes = self.read_mapped_async(&staging, "tensor readback").await?;
        Ok(bytemuck::pod_collect_to_vec(
            &bytes[..t.size_bytes() as usize],
        ))
    }

    /// Copy an f32 or f16 tensor back to the host as f32; works in the browser too (see
    /// `read_mapped_async`).
    pub async fn read_async(&self, t: &Tensor) -> Result<Vec<f32>> {
        if t.dtype() == DType::F16 {
            let bits: Vec<u16> = self.read_typed(t, DType::F16, "read_async()").await?;
            return Ok(from_f16_bits(&bits));
        }
        self.read_typed(t, DType::F32, "read_async()").await
    }

    /// Copy a u32 tensor back to the host; works in the browser too.
    pub async fn read_u32_async(&self, t: &Tensor) -> Result<Vec<u32>> {
        self.read_typed(t, DType::U32, "read_u32_async()").await
    }

    /// Submit a copy of `t` into a new MAP_READ buffer.
    fn readback_copy(&self, t: &Tensor, size: u64) -> wgpu::Buffer {
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor::default());
        enc.copy_buffer_to_buffer(&t.buffer, t.offset, &staging, 0, size);
        self.queue.submit([enc.finish()]);
        staging
    }

    /// Copy an f32 or f16 tensor back to the host as f32 (waits for the GPU).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn read(&self, t: &Tensor) -> Result<Vec<f32>> {
        pollster::block_on(self.read_async(t))
    }

    /// Copy a u32 tensor back to the host (waits for the GPU).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn read_u32(&self, t: &Tensor) -> Result<Vec<u32>> {
        pollster::block_on(self.read_typed(t, DType::U32, "read_u32()"))
    }
}

crate::gpu::uniform::uniform!(
    "fill.wgsl",
    FillParams,
    pub(crate) struct FillParams {
        pub count: u32,
        pub first: u32,
        pub seed: u32,
        pub grid_x: u32,
        pub skip: u32,
        pub scale: f32,
        pub _pad: [u32; 2],
    }
);

impl Gpu {
    /// A new tensor of uniform values in [-scale, scale), generated on the GPU from `seed`
    /// (reproducible; used for benchmarks, where host generation and upload would dominate).
    pub fn random_uniform(&self, shape: &[usize], seed: u32, scale: f32) -> Result<Tensor> {
        self.random_uniform_as(shape, seed, scale, DType::F32)
    }

    /// The same values in `dtype` (F16: each value rounded to the nearest f16).
    pub fn random_uniform_as(
        &self,
        shape: &[usize],
        seed: u32,
        scale: f32,
        dtype: DType,
    ) -> Result<Tensor> {
        use wgpu::util::DeviceExt;
        // The kernels write 4-byte words: one f32, or two f16 packed.
        let (entry, per_word) = match dtype {
            DType::F32 => ("uniform_fill", 1u64),
            DType::F16 => ("uniform_fill_f16", 2u64),
            DType::U32 => invalid!("random_uniform_as() makes F32 or F16 tensors, not U32"),
        };
        let t = self.empty(shape, dtype)?;
        let key = crate::gpu::PipelineKey {
            file: "fill.wgsl",
            entry,
            constants: vec![],
            checked: true,
            storage: crate::gpu::Storage::F32,
        };
        let pipe = self.pipeline(&key)?;
        let l = self.limits();
        let max_x = l.max_compute_workgroups_per_dimension as u64;
        // Elements per launch: within one binding (minus alignment slack) and one 2-D grid.
        let per = ((self.max_binding() - 256) / 4)
            .min(max_x * max_x * 256)
            .min(u32::MAX as u64 / 2);
        let total = (t.len() as u64).div_ceil(per_word);
        let mut enc = self.device.create_command_encoder(&Default::default());
        let mut first = 0u64;
        while first < total {
            let count = per.min(total - first);
            let offset = first * 4 / 256 * 256;
            let blocks = count.div_ceil(256);
            let gx = blocks.min(max_x);
            let p = FillParams {
                count: count as u32,
                first: (first * per_word) as u32,
                seed,
                grid_x: gx as u32,
                skip: ((first * 4 - offset) / 4) as u32,
                scale,
                _pad: [0; 2],
            };
            let ubuf = self
                .device
                .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some("fill-params"),
                    contents: bytemuck::bytes_of(&p),
                    usage: wgpu::BufferUsages::UNIFORM,
                });
            let bg = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("fill"),
                layout: &pipe.layout,
                entries: &[
                    wgpu::BindGroupEntry {
                        binding: 0,
                        resource: ubuf.as_entire_binding(),
                    },
                    wgpu::BindGroupEntry {
                        binding: 1,
                        resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                            buffer: &t.buffer,
                            offset,
                            size: std::num::NonZeroU64::new(first * 4 - offset + count * 4),
                        }),
                    },
                ],
            });
            let mut pass = enc.begin_compute_pass(&Default::default());
            pass.set_pipeline(&pipe.pipeline);
            pass.set_bind_group(0, &bg, &[]);
            pass.dispatch_workgroups(gx as u32, blocks.div_ceil(gx) as u32, 1);
            drop(pass);
            first += count;
        }
        self.scoped("random fill", || self.queue.submit([enc.finish()]))?;
        Ok(t)
    }
}

/// What a buffer-mapping callback delivers, and who waits for it.
#[derive(Default)]
struct Delivery {
    result: Option<std::result::Result<(), String>>,
    waker: Option<std::task::Waker>,
}

/// Resolves when the mapping callback has run (a one-shot channel without dependencies).
struct Delivered(Arc<Mutex<Delivery>>);

impl std::future::Future for Delivered {
    type Output = std::result::Result<(), String>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let mut d = self.0.lock().expect("delivery");
        match d.result.take() {
            Some(r) => std::task::Poll::Ready(r),
            None => {
                d.waker = Some(cx.waker().clone());
                std::task::Poll::Pending
            }
        }
    }
}
