//! NOSA's offloaded KV cache (NOSA.md §4; `shaders/offload.wgsl`): k, v and the bias of every
//! token live in host memory (a [`KvCache`] with [`CacheConfig::host_memory`], which the append
//! kernel writes in place); per (sequence, kv head) a fixed number of GPU slots of one block
//! each hold the blocks the last selections picked. Each step: select from the pooled state,
//! diff the selection against the block map on the GPU, copy only the missing blocks from host
//! memory into freed slots (one gather kernel reading host memory: no host round trip), and
//! attend over the slots with `DecodeAttention` built with [`DecodeConfig::slots`].
//!
//! Host -> GPU path: kernels read the host store in place (`MAPPABLE_PRIMARY_BUFFERS`, native
//! Vulkan/Metal/DX12). Adapters without it (the browser) get an error that says so.

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
}

impl OffloadConfig {
    pub fn new(dtype: DType, select: SelectOptions, slots: usize) -> Self {
        Self {
            dtype,
            select,
            bias: select.evict > 0,
            slots,
        }
    }

    /// Bytes of GPU memory one slot takes per (sequence, kv head): a block of k, v (and bias).
    pub fn slot_bytes(dtype: DType, block: usize, head_dim: usize, bias: bool) -> u64 {
        (block * (2 * head_dim * dtype.size() + 4 * bias as usize)) as u64
    }
}

/// Counters of the steps so far: selected blocks, those already on the GPU, blocks copied.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OffloadStats {
    pub selected: u64,
    pub hits: u64,
    pub loaded: u64,
}

impl OffloadStats {
    /// Share of selected blocks found on the GPU (the block being filled is always copied
    /// again, so it counts as a miss).
    pub fn hit_rate(&self) -> f64 {
        self.hits as f64 / self.selected.max(1) as f64
    }
}

/// The offloaded cache of one attention layer for a batch of sequences.
#[derive(Debug)]
pub struct OffloadCache {
    host: KvCache,
    config: OffloadConfig,
    slot_k: Tensor,
    slot_v: Tensor,
    slot_bias: Option<Tensor>,
    /// `[b, hkv, slots]`: the block in each slot.
    map: Tensor,
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
        if !gpu.has_host_memory() {
            return Err(Error::Unsupported(
                "the offloaded KV cache keeps k and v in host memory that kernels read in place; \
                 this device cannot (open it with GpuOptions::host_memory on a native adapter \
                 with MAPPABLE_PRIMARY_BUFFERS)"
                    .into(),
            ));
        }
        let host = KvCache::new(
            gpu,
            shape,
            &CacheConfig::new(dtype)
                .bias(bias)
                .select(Some(select))
                .host_memory(true),
        )?;
        // One binding per tensor (the kernels do not split the batch yet).
        let max_bind = gpu.max_binding();
        let rows = shape.batch * shape.heads_kv;
        for (what, bytes) in [
            ("host k (or v)", host.k().size_bytes()),
            (
                "GPU slots of k (or v)",
                (rows * slots * block * shape.head_dim * dtype.size()) as u64,
            ),
        ] {
            if bytes > max_bind {
                return Err(Error::Unsupported(format!(
                    "the {what} of this layer take {bytes} bytes, more than this device binds at \
                     once ({max_bind}); use a smaller batch or capacity per cache"
                )));
            }
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
            config: *config,
            slot_k: gpu.empty(&slot_dims, dtype)?,
            slot_v: gpu.empty(&slot_dims, dtype)?,
            slot_bias: match bias {
                true => Some(gpu.empty(&slot_dims[..3], DType::F32)?),
                false => None,
            },
            map,
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

    pub fn host(&self) -> &KvCache {
        &self.host
    }
    pub fn lens(&self) -> &[u32] {
        self.host.lens()
    }
    /// The block in each slot `[b, hkv, slots]` (SENTINEL: empty; high bit: a copy of a block
    /// that was still filling).
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

    /// GPU memory of the cache: slots, map, lists, lengths, pooled state, scratch.
    pub fn gpu_bytes(&self) -> u64 {
        let mut n = self.slot_k.size_bytes() + self.slot_v.size_bytes();
        n += self.slot_bias.as_ref().map_or(0, |t| t.size_bytes());
        for t in [&self.map, &self.sel, &self.pairs, &self.loads, &self.counts] {
            n += t.size_bytes();
        }
        n + self.host.gpu_bytes()
    }
    /// Host memory of the cache (k, v, bias of every token).
    pub fn host_bytes(&self) -> u64 {
        self.host.store_bytes()
    }

    /// Append tokens (see [`KvCache::append`]): written to host memory in place, pooled.
    pub fn append(
        &mut self,
        gpu: &Gpu,
        enc: &mut wgpu::CommandEncoder,
        k_new: &Tensor,
        v_new: &Tensor,
        bias_new: Option<&Tensor>,
        counts: Option<&[u32]>,
    ) -> Result<()> {
        self.host.append(gpu, enc, k_new, v_new, bias_new, counts)
    }

    /// One step's cache work for the newest token's queries `q` `[b, hq, 1, d]`: select, diff
    /// against the slots, copy the missing blocks in. Then attend with [`Self::inputs`].
    pub fn prepare(&mut self, gpu: &Gpu, enc: &mut wgpu::CommandEncoder, q: &Tensor) -> Result<()> {
        if q.shape().get(2) != Some(&1) {
            invalid!(
                "q has shape {:?}: the offloaded cache decodes one token per sequence per step",
                q.shape()
            );
        }
        let sel = self.sel.clone();
        self.host.select(gpu, enc, q, &sel)?;
        let s = *self.host.shape();
        let units = (s.batch * s.heads_kv) as u64;
        let k = self.config.select.k as u64;
        check_args(&[
            input("selection", &self.sel, self.sel.shape(), DType::U32),
            output("map", &self.map, self.map.shape(), DType::U32),
            output("pairs", &self.pairs, self.pairs.shape(), DType::U32),
            output("loads", &self.loads, self.loads.shape(), DType::U32),
            output("counts", &self.counts, self.counts.shape(), DType::U32),
        ])?;
        let whole = |t: &Tensor| window_sized(0, t.len() as u64, 256, t.dtype().size() as u64);
        let max_x = gpu.limits().max_compute_workgroups_per_dimension as u64;
        let grid = |n: u64| {
            let gx = n.clamp(1, max_x);
            (gx as u32, n.div_ceil(gx) as u32)
        };
        let g = grid(units);
        let p = OffloadParams {
            cap: s.capacity as u32,
            heads_kv: s.heads_kv as u32,
            units: units as u32,
            grid_x: g.0,
        };
        let lens = self.host.lens_tensor();
        launch::dispatch(
            gpu,
            enc,
            &self.diff,
            bytemuck::bytes_of(&p),
            &[
                (1, &self.sel, whole(&self.sel)),
                (2, lens, whole(lens)),
                (3, &self.map, whole(&self.map)),
                (4, &self.pairs, whole(&self.pairs)),
                (5, &self.loads, whole(&self.loads)),
                (6, &self.counts, whole(&self.counts)),
                (7, &self.stats, whole(&self.stats)),
            ],
            g,
        );
        let g = grid(units * k);
        let p = OffloadParams { grid_x: g.0, ..p };
        let mut views = vec![
            (5, &self.loads, whole(&self.loads)),
            (6, &self.counts, whole(&self.counts)),
            (8, self.host.k(), whole(self.host.k())),
            (9, self.host.v(), whole(self.host.v())),
            (10, &self.slot_k, whole(&self.slot_k)),
            (11, &self.slot_v, whole(&self.slot_v)),
        ];
        if let (Some(hb), Some(sb)) = (self.host.bias(), &self.slot_bias) {
            views.push((12, hb, whole(hb)));
            views.push((13, sb, whole(sb)));
        }
        launch::dispatch(gpu, enc, &self.gather, bytemuck::bytes_of(&p), &views, g);
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
        }
    }

    /// Zero the counters (before the next submission).
    pub fn reset_stats(&self, gpu: &Gpu) -> Result<()> {
        gpu.write_u32(&self.stats, &[0; 4])
    }
}
