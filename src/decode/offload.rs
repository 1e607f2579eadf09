//! NOSA's offloaded KV cache (NOSA.md §4; `shaders/offload.wgsl`): k, v and the bias of every
//! token live in host memory (a [`KvCache`] with [`CacheConfig::host_memory`], which the append
//! kernel writes in place); per (sequence, kv head) a fixed number of GPU slots of one block
//! each hold the blocks the last selections picked, the last of them (the tail) the block being
//! filled. Each step: select from the pooled state, diff the selection against the block map on
//! the GPU, copy only the missing blocks from host memory into freed slots, least recently used
//! first, so that slots beyond the selection keep recent blocks, and the new token's row into
//! the tail (one gather kernel reading host memory: no host round trip), and attend over the
//! slots with `DecodeAttention` built with [`DecodeConfig::slots`].
//!
//! Host -> GPU paths ([`OffloadPath`]): `InPlace` keeps the store in host memory that kernels
//! read in place (`MAPPABLE_PRIMARY_BUFFERS`, native Vulkan/Metal/DX12; no host round trip).
//! `Staged` runs anywhere, the browser included: the store is the host's own memory, the GPU
//! keeps only the most recent tokens (a ring, for the pooled state) besides the slots, and each
//! step the host reads back the new tokens and the load list the diff made, appends the tokens
//! to the store, and writes each missing block into its slot (`queue.write_buffer`): one wait
//! for the GPU per step.

use crate::gpu::Encoder;
use std::sync::Arc;

use crate::decode::attention::{DecodeConfig, DecodeInputs};
use crate::decode::cache::{CacheConfig, KvCache};
use crate::error::{Error, Result, invalid};
use crate::gpu::{DType, Gpu, Pipeline, PipelineKey, Storage, Tensor};
use crate::ops::launch::{self, check_args, input, output, window_sized};
use crate::problem::{CacheShape, DecodeKeys, SENTINEL, SelectOptions};

const NT: u32 = 64;

crate::gpu::uniform::uniform!(
    "offload.wgsl",
    OffloadParams,
    /// Uniform block of `shaders/offload.wgsl`.
    pub(crate) struct OffloadParams {
        pub cap: u32,
        pub heads_kv: u32,
        pub units: u32,
        pub grid_x: u32,
    }
);

/// What an [`OffloadCache`] is built for besides the shape.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OffloadConfig {
    /// k and v (F32 or F16).
    pub dtype: DType,
    /// The selection each step (InfLLM-V2, or NOSA with `evict > 0`, which needs `bias`).
    pub select: SelectOptions,
    /// A per-key bias (NOSA's eviction score; also attention's bias).
    pub bias: bool,
    /// GPU slots per (sequence, kv head), each one block: at least the selection's k.
    pub slots: usize,
    /// How blocks reach the GPU.
    pub path: OffloadPath,
}

/// How an offloaded cache moves blocks from host memory to the GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum OffloadPath {
    /// `InPlace` where the device has host-memory tensors ([`Gpu::has_host_memory`]), else
    /// `Staged`.
    #[default]
    Auto,
    /// The store in host memory that a gather kernel reads in place: no host round trip.
    InPlace,
    /// The store in the host's own memory, missing blocks written by the host each step.
    Staged,
}

impl OffloadPath {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "in-place" => Ok(Self::InPlace),
            "staged" => Ok(Self::Staged),
            _ => invalid!("unknown offload path `{s}` (auto, in-place, staged)"),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::InPlace => "in-place",
            Self::Staged => "staged",
        }
    }
}

impl OffloadConfig {
    pub fn new(dtype: DType, select: SelectOptions, slots: usize) -> Self {
        Self {
            dtype,
            select,
            bias: select.evict > 0,
            slots,
            path: OffloadPath::Auto,
        }
    }

    pub fn path(self, path: OffloadPath) -> Self {
        Self { path, ..self }
    }

    /// Bytes of GPU memory one slot takes per (sequence, kv head): a block of k, v (and bias).
    pub fn slot_bytes(dtype: DType, block: usize, head_dim: usize, bias: bool) -> u64 {
        (block * (2 * head_dim * dtype.size() + 4 * bias as usize)) as u64
    }

    /// Bytes of bookkeeping per slot besides its block: its map entry and its age (u32 each).
    pub const SLOT_STATE_BYTES: u64 = 8;
}

/// A zeroed host buffer of `n` elements, or an error that says the allocation failed.
fn host_vec<T: Clone + Default>(n: usize, what: &str) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| {
        Error::Unsupported(format!(
            "the offloaded cache's host store of {what} needs {} bytes; the host could not \
             allocate them",
            n * std::mem::size_of::<T>()
        ))
    })?;
    v.resize(n, T::default());
    Ok(v)
}

/// Counters of the steps so far: selected blocks, those already on the GPU, blocks copied, and
/// rows copied into the tail (the block being filled).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OffloadStats {
    pub selected: u64,
    pub hits: u64,
    pub loaded: u64,
    pub tail_rows: u64,
}

impl OffloadStats {
    /// Share of selected blocks found on the GPU (the block being filled counts as found when
    /// the tail held it, i.e. only the new token's row was copied).
    pub fn hit_rate(&self) -> f64 {
        self.hits as f64 / self.selected.max(1) as f64
    }

    /// Bytes copied host -> GPU: whole blocks of `block` rows and the tail's rows, for
    /// [`OffloadConfig::slot_bytes`] per block.
    pub fn copied_bytes(&self, slot_bytes: u64, block: usize) -> u64 {
        self.loaded * slot_bytes + self.tail_rows * slot_bytes / block as u64
    }
}

impl std::ops::AddAssign for OffloadStats {
    fn add_assign(&mut self, o: Self) {
        self.selected += o.selected;
        self.hits += o.hits;
        self.loaded += o.loaded;
        self.tail_rows += o.tail_rows;
    }
}

/// The staged path's store: k, v (bytes, rows of head_dim elements) and the bias of every
/// token, `[b, hkv, capacity]` rows, in the host's memory.
struct HostStore {
    k: Vec<u8>,
    v: Vec<u8>,
    bias: Vec<f32>,
    row: usize,
}

impl std::fmt::Debug for HostStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "HostStore {{ {} + {} bytes, {} biases, rows of {} bytes }}",
            self.k.len(),
            self.v.len(),
            self.bias.len(),
            self.row
        )
    }
}

/// New tokens on their way to the host store (copied into `buf` by the append's commands).
#[derive(Debug)]
struct Pending {
    buf: wgpu::Buffer,
    n: usize,
    counts: Vec<u32>,
    lens: Vec<u32>,
}

/// The offloaded cache of one attention layer for a batch of sequences.
#[derive(Debug)]
pub struct OffloadCache {
    /// InPlace: the whole cache in host memory; Staged: the recent tokens (a ring) on the GPU.
    host: KvCache,
    config: OffloadConfig,
    /// The path in use (never Auto).
    path: OffloadPath,
    store: Option<HostStore>,
    pending: Vec<Pending>,
    slot_k: Tensor,
    slot_v: Tensor,
    slot_bias: Option<Tensor>,
    /// `[b, hkv, slots]`: the block in each slot, and the steps since it was last selected (the
    /// diff hands out the least recently used freed slots first); for the last slot, the tail,
    /// the rows of its block it holds.
    map: Tensor,
    ages: Tensor,
    /// `[b, hkv, 2]`: the host rows the tail takes this step.
    tails: Tensor,
    /// `[b, hkv, capacity / block]`: the slot each block was last given (the diff trusts it
    /// where the map agrees).
    rev: Tensor,
    /// This step's selection `[b, hkv, 1, k]`, its (block, slot) pairs `[b, hkv, 1, 2k]`, the
    /// load list `[b, hkv, 2k]` and its length `[b, hkv]`.
    sel: Tensor,
    pairs: Tensor,
    loads: Tensor,
    counts: Tensor,
    stats: Tensor,
    diff: Arc<Pipeline>,
    gather: Arc<Pipeline>,
}

impl OffloadCache {
    pub fn new(gpu: &Gpu, shape: CacheShape, config: &OffloadConfig) -> Result<Self> {
        let OffloadConfig {
            dtype,
            select,
            bias,
            slots,
            path,
        } = *config;
        shape.validate()?;
        let (block, k) = (select.block, select.k);
        if !shape.capacity.is_multiple_of(block) {
            invalid!(
                "an offloaded cache holds whole blocks: capacity {} is not a multiple of the \
                 block size {block}",
                shape.capacity
            );
        }
        if slots < k {
            let per = OffloadConfig::slot_bytes(dtype, block, shape.head_dim, bias);
            invalid!(
                "{slots} GPU slots per (sequence, kv head) cannot hold one step's selection of \
                 {k} blocks: the minimum is {k} slots = {:.2} MB for this cache",
                (k as u64 * per * (shape.batch * shape.heads_kv) as u64) as f64 / 1e6
            );
        }
        if slots > shape.capacity / block {
            invalid!(
                "{slots} GPU slots per (sequence, kv head) exceed the {} blocks of the cache",
                shape.capacity / block
            );
        }
        let path = match path {
            OffloadPath::Auto if gpu.has_host_memory() => OffloadPath::InPlace,
            OffloadPath::Auto => OffloadPath::Staged,
            p => p,
        };
        if path == OffloadPath::InPlace && !gpu.has_host_memory() {
            return Err(Error::Unsupported(
                "the in-place offload path keeps k and v in host memory that kernels read in \
                 place; this device cannot (open it with GpuOptions::host_memory on a native \
                 adapter with MAPPABLE_PRIMARY_BUFFERS, or take OffloadPath::Staged)"
                    .into(),
            ));
        }
        let rows = shape.batch * shape.heads_kv;
        let cache = CacheConfig::new(dtype).bias(bias).select(Some(select));
        let (host, store) = match path {
            OffloadPath::Staged => {
                // The GPU keeps the pooled state's recent keys: a window and a block or two.
                let w = crate::problem::pooling(&select).0;
                let ring = (w + 2 * block).next_multiple_of(block).min(shape.capacity);
                let row = shape.head_dim * dtype.size();
                let cells = rows * shape.capacity;
                (
                    KvCache::new(gpu, shape, &cache.ring(Some(ring)))?,
                    Some(HostStore {
                        k: host_vec(cells * row, "k")?,
                        v: host_vec(cells * row, "v")?,
                        bias: match bias {
                            true => host_vec(cells, "bias")?,
                            false => Vec::new(),
                        },
                        row,
                    }),
                )
            }
            _ => (KvCache::new(gpu, shape, &cache.host_memory(true))?, None),
        };
        // One binding per tensor (the kernels do not split the batch yet).
        let max_bind = gpu.max_binding();
        let mut bound = vec![(
            "GPU slots of k (or v)",
            (rows * slots * block * shape.head_dim * dtype.size()) as u64,
        )];
        if store.is_none() {
            bound.push(("host k (or v)", host.k().size_bytes()));
        }
        for (what, bytes) in bound {
            if bytes > max_bind {
                return Err(Error::Unsupported(format!(
                    "the {what} of this layer take {bytes} bytes, more than this device binds at \
                     once ({max_bind}); use a smaller batch or capacity per cache"
                )));
            }
        }
        // The diff kernel's workgroup memory: the selection and its slots, the map, the keep
        // flags / ages and the LRU order (sorted: a power of two of the slots before the tail).
        let need =
            |slots: usize| (8 * k + 4 * slots + 8 * (slots - 1).next_power_of_two().max(2)) as u64;
        let nsp = (slots - 1).next_power_of_two().max(2);
        let max_shared = gpu.limits().max_compute_workgroup_storage_size as u64;
        if need(slots) > max_shared {
            let most = (k..slots)
                .rev()
                .find(|&s| need(s) <= max_shared)
                .unwrap_or(0);
            return Err(Error::Unsupported(format!(
                "{slots} GPU slots per (sequence, kv head) need {} bytes of workgroup memory in \
                 the offload diff; this device has {max_shared} (at most {most} slots)",
                need(slots)
            )));
        }
        let storage = Storage::for_dtype(gpu, dtype)?;
        let key = |entry| PipelineKey {
            file: "offload.wgsl",
            entry,
            constants: vec![
                ("D", shape.head_dim as u32),
                ("NT", NT),
                ("BLK", block as u32),
                ("NSLOT", slots as u32),
                ("NSP", nsp as u32),
                ("KSEL", k as u32),
                ("HAS_BIAS", bias as u32),
            ],
            checked: false,
            storage,
        };
        let slot_dims = [shape.batch, shape.heads_kv, slots * block, shape.head_dim];
        let map = gpu.upload_u32(
            &[shape.batch, shape.heads_kv, slots],
            &vec![SENTINEL; rows * slots],
        )?;
        Ok(Self {
            config: OffloadConfig { path, ..*config },
            path,
            store,
            pending: Vec::new(),
            slot_k: gpu.empty(&slot_dims, dtype)?,
            slot_v: gpu.empty(&slot_dims, dtype)?,
            slot_bias: match bias {
                true => Some(gpu.empty(&slot_dims[..3], DType::F32)?),
                false => None,
            },
            map,
            ages: gpu.upload_u32(
                &[shape.batch, shape.heads_kv, slots],
                &vec![0; rows * slots],
            )?,
            tails: gpu.empty(&[shape.batch, shape.heads_kv, 2], DType::U32)?,
            rev: gpu.upload_u32(
                &[shape.batch, shape.heads_kv, shape.capacity / block],
                &vec![SENTINEL; rows * (shape.capacity / block)],
            )?,
            sel: gpu.empty(&[shape.batch, shape.heads_kv, 1, k], DType::U32)?,
            pairs: gpu.empty(&[shape.batch, shape.heads_kv, 1, 2 * k], DType::U32)?,
            loads: gpu.empty(&[shape.batch, shape.heads_kv, 2 * k], DType::U32)?,
            counts: gpu.empty(&[shape.batch, shape.heads_kv], DType::U32)?,
            stats: gpu.upload_u32(&[4], &[0; 4])?,
            diff: gpu.pipeline(&key("diff"))?,
            gather: gpu.pipeline(&key("gather"))?,
            host,
        })
    }

    /// The decoding attention that reads this cache's slots (`keys` of the selection).
    pub fn attention_config(&self) -> DecodeConfig {
        let s = self.config.select;
        DecodeConfig::new(DecodeKeys::Sparse {
            block: s.block,
            nsel: s.k,
        })
        .bias(self.config.bias)
        .dtype(self.config.dtype)
        .slots(Some(self.config.slots))
    }

    /// The path in use (`InPlace` or `Staged`).
    pub fn path(&self) -> OffloadPath {
        self.path
    }
    /// The GPU-side cache: the whole store in host memory (`InPlace`), or the ring of recent
    /// tokens (`Staged`); either keeps the lengths and the pooled state.
    pub fn host(&self) -> &KvCache {
        &self.host
    }
    pub fn lens(&self) -> &[u32] {
        self.host.lens()
    }
    /// The block in each slot `[b, hkv, slots]` (SENTINEL: empty); the last slot is the tail,
    /// which holds the block being filled.
    pub fn map(&self) -> &Tensor {
        &self.map
    }
    pub fn slot_k(&self) -> &Tensor {
        &self.slot_k
    }
    pub fn slot_v(&self) -> &Tensor {
        &self.slot_v
    }
    /// This step's selection `[b, hkv, 1, k]` (logical blocks).
    pub fn selection(&self) -> &Tensor {
        &self.sel
    }

    /// Make the one-token selection's op and scratch now (see [`KvCache::reserve_select`]).
    pub fn reserve_select(&mut self, gpu: &Gpu, heads_q: usize) -> Result<()> {
        self.host.reserve_select(gpu, 1, heads_q).map(|_| ())
    }

    /// GPU memory of the cache: slots, map, lists, lengths, pooled state, scratch.
    pub fn gpu_bytes(&self) -> u64 {
        let mut n = self.slot_k.size_bytes() + self.slot_v.size_bytes();
        n += self.slot_bias.as_ref().map_or(0, |t| t.size_bytes());
        for t in [
            &self.map,
            &self.ages,
            &self.tails,
            &self.rev,
            &self.sel,
            &self.pairs,
            &self.loads,
            &self.counts,
        ] {
            n += t.size_bytes();
        }
        n + self.host.gpu_bytes()
    }
    /// Host memory of the cache (k, v, bias of every token).
    pub fn host_bytes(&self) -> u64 {
        match &self.store {
            Some(st) => (st.k.len() + st.v.len() + 4 * st.bias.len()) as u64,
            None => self.host.store_bytes(),
        }
    }

    /// The store's k and v as f32 `[b, hkv, capacity, d]` (rows past each length undefined),
    /// for checks: read back (`InPlace`) or converted from the host's copy (`Staged`, as of
    /// the last [`Self::prepare`]). A sync point.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn read_store(&self, gpu: &Gpu) -> Result<(Vec<f32>, Vec<f32>)> {
        let Some(st) = &self.store else {
            return Ok((gpu.read(self.host.k())?, gpu.read(self.host.v())?));
        };
        let f = |b: &[u8]| match self.config.dtype {
            DType::F16 => crate::gpu::from_f16_bits(&bytemuck::pod_collect_to_vec(b)),
            _ => bytemuck::pod_collect_to_vec(b),
        };
        Ok((f(&st.k), f(&st.v)))
    }

    /// Append tokens (see [`KvCache::append`]): written to host memory in place and pooled
    /// (`InPlace`), or pooled from the GPU's ring and copied for the host, which files them in
    /// its store at the next [`Self::prepare`] (`Staged`).
    pub fn append(
        &mut self,
        gpu: &Gpu,
        enc: &mut Encoder,
        k_new: &Tensor,
        v_new: &Tensor,
        bias_new: Option<&Tensor>,
        counts: Option<&[u32]>,
    ) -> Result<()> {
        let lens = self.host.lens().to_vec();
        self.host.append(gpu, enc, k_new, v_new, bias_new, counts)?;
        if self.store.is_none() {
            return Ok(());
        }
        // Validated by the append above: [b, hkv, n, d] (and [b, hkv, n]).
        let n = k_new.shape()[2];
        let parts: Vec<&Tensor> = [Some(k_new), Some(v_new), bias_new]
            .into_iter()
            .flatten()
            .collect();
        let sizes: Vec<u64> = parts
            .iter()
            .map(|t| t.size_bytes().next_multiple_of(4))
            .collect();
        for t in &parts {
            if t.offset() % wgpu::COPY_BUFFER_ALIGNMENT != 0 {
                invalid!(
                    "the staged offloaded cache copies new tokens from 4-byte-aligned tensors"
                );
            }
        }
        let buf = gpu.device().create_buffer(&wgpu::BufferDescriptor {
            label: Some("offload: new tokens"),
            size: sizes.iter().sum::<u64>().max(4),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut at = 0;
        for (t, &size) in parts.iter().zip(&sizes) {
            enc.raw()
                .copy_buffer_to_buffer(t.buffer(), t.offset(), &buf, at, size);
            at += size;
        }
        let batch = self.host.shape().batch;
        self.pending.push(Pending {
            buf,
            n,
            counts: counts.map_or(vec![n as u32; batch], <[u32]>::to_vec),
            lens,
        });
        Ok(())
    }

    /// One step's cache work for the newest token's queries `q` `[b, hq, 1, d]`: select, diff
    /// against the slots, copy the missing blocks in. Then attend with [`Self::inputs`].
    /// `Staged`: submits what `enc` holds, waits for it, writes the missing blocks, and leaves a
    /// fresh encoder in `enc` (in the browser, use [`Self::prepare_async`]).
    pub fn prepare(&mut self, gpu: &Gpu, enc: &mut Encoder, q: &Tensor) -> Result<()> {
        match self.path {
            OffloadPath::Staged => {
                #[cfg(not(target_arch = "wasm32"))]
                return pollster::block_on(self.prepare_staged(gpu, enc, q));
                #[cfg(target_arch = "wasm32")]
                invalid!(
                    "the staged offloaded cache waits for the GPU each step: use prepare_async"
                )
            }
            _ => {
                self.select_diff(gpu, enc, q)?;
                self.gather(gpu, enc);
                Ok(())
            }
        }
    }

    /// [`Self::prepare`] without blocking (the browser's way, where only `Staged` exists).
    pub async fn prepare_async(&mut self, gpu: &Gpu, enc: &mut Encoder, q: &Tensor) -> Result<()> {
        match self.path {
            OffloadPath::Staged => self.prepare_staged(gpu, enc, q).await,
            _ => {
                self.select_diff(gpu, enc, q)?;
                self.gather(gpu, enc);
                Ok(())
            }
        }
    }

    fn whole(t: &Tensor) -> launch::Window {
        window_sized(0, t.len() as u64, 256, t.dtype().size() as u64)
    }

    fn params(&self, gpu: &Gpu, n: u64) -> (OffloadParams, (u32, u32)) {
        let s = *self.host.shape();
        let max_x = gpu.limits().max_compute_workgroups_per_dimension as u64;
        let gx = n.clamp(1, max_x);
        let p = OffloadParams {
            cap: s.capacity as u32,
            heads_kv: s.heads_kv as u32,
            units: (s.batch * s.heads_kv) as u32,
            grid_x: gx as u32,
        };
        (p, (gx as u32, n.div_ceil(gx) as u32))
    }

    /// Select from the pooled state and diff against the block map (pairs, load list).
    fn select_diff(&mut self, gpu: &Gpu, enc: &mut Encoder, q: &Tensor) -> Result<()> {
        if q.shape().get(2) != Some(&1) {
            invalid!(
                "q has shape {:?}: the offloaded cache decodes one token per sequence per step",
                q.shape()
            );
        }
        let sel = self.sel.clone();
        self.host.select(gpu, enc, q, &sel)?;
        check_args(&[
            input("selection", &self.sel, self.sel.shape(), DType::U32),
            output("map", &self.map, self.map.shape(), DType::U32),
            output("ages", &self.ages, self.ages.shape(), DType::U32),
            output("pairs", &self.pairs, self.pairs.shape(), DType::U32),
            output("loads", &self.loads, self.loads.shape(), DType::U32),
            output("counts", &self.counts, self.counts.shape(), DType::U32),
            output("tails", &self.tails, self.tails.shape(), DType::U32),
            output("reverse map", &self.rev, self.rev.shape(), DType::U32),
        ])?;
        let s = *self.host.shape();
        let (p, g) = self.params(gpu, (s.batch * s.heads_kv) as u64);
        let lens = self.host.lens_tensor();
        let w = Self::whole;
        launch::dispatch(
            gpu,
            enc,
            &self.diff,
            bytemuck::bytes_of(&p),
            &[
                (1, &self.sel, w(&self.sel)),
                (2, lens, w(lens)),
                (3, &self.map, w(&self.map)),
                (4, &self.pairs, w(&self.pairs)),
                (5, &self.loads, w(&self.loads)),
                (6, &self.counts, w(&self.counts)),
                (7, &self.stats, w(&self.stats)),
                (14, &self.ages, w(&self.ages)),
                (15, &self.tails, w(&self.tails)),
                (16, &self.rev, w(&self.rev)),
            ],
            g,
        );
        Ok(())
    }

    /// InPlace: the gather kernel copies the load list's blocks and the tail's rows from host
    /// memory.
    fn gather(&self, gpu: &Gpu, enc: &mut Encoder) {
        let s = *self.host.shape();
        let k = self.config.select.k as u64;
        let (p, g) = self.params(gpu, (s.batch * s.heads_kv) as u64 * (k + 1));
        let w = Self::whole;
        let mut views = vec![
            (5, &self.loads, w(&self.loads)),
            (6, &self.counts, w(&self.counts)),
            (15, &self.tails, w(&self.tails)),
            (8, self.host.k(), w(self.host.k())),
            (9, self.host.v(), w(self.host.v())),
            (10, &self.slot_k, w(&self.slot_k)),
            (11, &self.slot_v, w(&self.slot_v)),
        ];
        if let (Some(hb), Some(sb)) = (self.host.bias(), &self.slot_bias) {
            views.push((12, hb, w(hb)));
            views.push((13, sb, w(sb)));
        }
        launch::dispatch(gpu, enc, &self.gather, bytemuck::bytes_of(&p), &views, g);
    }

    /// Staged: select and diff, read back the new tokens and the load list (one wait), file
    /// the tokens in the host store, write each missing block into its slot.
    async fn prepare_staged(&mut self, gpu: &Gpu, enc: &mut Encoder, q: &Tensor) -> Result<()> {
        self.select_diff(gpu, enc, q)?;
        let (lb, cb, tb) = (
            self.loads.size_bytes(),
            self.counts.size_bytes(),
            self.tails.size_bytes(),
        );
        let rb = gpu.device().create_buffer(&wgpu::BufferDescriptor {
            label: Some("offload: load list"),
            size: lb + cb + tb,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        enc.raw()
            .copy_buffer_to_buffer(self.loads.buffer(), self.loads.offset(), &rb, 0, lb);
        enc.raw()
            .copy_buffer_to_buffer(self.counts.buffer(), self.counts.offset(), &rb, lb, cb);
        enc.raw()
            .copy_buffer_to_buffer(self.tails.buffer(), self.tails.offset(), &rb, lb + cb, tb);
        let done = enc.split(gpu.device());
        gpu.scoped("offloaded cache step", || gpu.queue().submit([done]))?;
        let s = *self.host.shape();
        let (cap, hkv, units) = (s.capacity, s.heads_kv, s.batch * s.heads_kv);
        let bias = self.config.bias;
        let Some(st) = self.store.as_mut() else {
            invalid!("the staged path has no host store");
        };
        let row = st.row;
        for p in std::mem::take(&mut self.pending) {
            let bytes = gpu.read_mapped_async(&p.buf, "offload: new tokens").await?;
            let kv = units * p.n * row;
            let (kb, rest) = bytes.split_at(kv.next_multiple_of(4));
            let (vb, bb) = rest.split_at(kv.next_multiple_of(4));
            let bb: Vec<f32> = match bias {
                true => bytemuck::pod_collect_to_vec(&bb[..units * p.n * 4]),
                false => Vec::new(),
            };
            for u in 0..units {
                let b = u / hkv;
                for j in 0..p.counts[b] as usize {
                    let pos = p.lens[b] as usize + j;
                    if pos >= cap {
                        break;
                    }
                    let (dst, src) = ((u * cap + pos) * row, (u * p.n + j) * row);
                    st.k[dst..dst + row].copy_from_slice(&kb[src..src + row]);
                    st.v[dst..dst + row].copy_from_slice(&vb[src..src + row]);
                    if bias {
                        st.bias[u * cap + pos] = bb[u * p.n + j];
                    }
                }
            }
        }
        let bytes = gpu.read_mapped_async(&rb, "offload: load list").await?;
        let loads: Vec<u32> = bytemuck::pod_collect_to_vec(&bytes[..lb as usize]);
        let counts: Vec<u32> =
            bytemuck::pod_collect_to_vec(&bytes[lb as usize..(lb + cb) as usize]);
        let tails: Vec<u32> = bytemuck::pod_collect_to_vec(&bytes[(lb + cb) as usize..]);
        let (blk, k, nslot) = (
            self.config.select.block,
            self.config.select.k,
            self.config.slots,
        );
        let q = gpu.queue();
        // `n` host rows from row `src` of the store to row `dst` of the slots.
        let write = |src: usize, dst: usize, n: usize| {
            let (src_b, dst_b, nb) = (src * row, (dst * row) as u64, n * row);
            q.write_buffer(
                self.slot_k.buffer(),
                self.slot_k.offset() + dst_b,
                &st.k[src_b..src_b + nb],
            );
            q.write_buffer(
                self.slot_v.buffer(),
                self.slot_v.offset() + dst_b,
                &st.v[src_b..src_b + nb],
            );
            if let Some(sb) = &self.slot_bias {
                q.write_buffer(
                    sb.buffer(),
                    sb.offset() + (dst * 4) as u64,
                    bytemuck::cast_slice(&st.bias[src..src + n]),
                );
            }
        };
        for u in 0..units {
            for i in 0..(counts[u] as usize).min(k) {
                let (b, slot) = (
                    loads[2 * (u * k + i)] as usize,
                    loads[2 * (u * k + i) + 1] as usize,
                );
                // A corrupt entry writes nothing (as the gather kernel reads nothing).
                if b >= cap / blk || slot + 1 >= nslot {
                    continue;
                }
                write(u * cap + b * blk, (u * nslot + slot) * blk, blk);
            }
            // The tail's rows, all of one block.
            let (from, to) = (tails[2 * u] as usize, tails[2 * u + 1] as usize);
            if from < to && to <= cap && from / blk == (to - 1) / blk {
                let tail = (u * nslot + nslot - 1) * blk;
                write(u * cap + from, tail + from % blk, to - from);
            }
        }
        Ok(())
    }

    /// The inputs of the step's attention over the slots (after [`Self::prepare`]).
    pub fn inputs<'a>(&'a self, q: &'a Tensor) -> DecodeInputs<'a> {
        DecodeInputs::new(q, &self.slot_k, &self.slot_v, self.host.lens_tensor())
            .sel(Some(&self.pairs))
            .bias(self.slot_bias.as_ref())
    }

    /// The counters since the cache was made or last reset (reads them back: a sync point).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn stats(&self, gpu: &Gpu) -> Result<OffloadStats> {
        Ok(Self::counters(&gpu.read_u32(&self.stats)?))
    }

    /// [`Self::stats`] without blocking (the browser's way).
    pub async fn stats_async(&self, gpu: &Gpu) -> Result<OffloadStats> {
        Ok(Self::counters(&gpu.read_u32_async(&self.stats).await?))
    }

    fn counters(s: &[u32]) -> OffloadStats {
        OffloadStats {
            selected: s[0] as u64,
            hits: s[1] as u64,
            loaded: s[2] as u64,
            tail_rows: s[3] as u64,
        }
    }

    /// Zero the counters (before the next submission).
    pub fn reset_stats(&self, gpu: &Gpu) -> Result<()> {
        gpu.write_u32(&self.stats, &[0; 4])
    }
}
