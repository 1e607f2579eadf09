//! The KV cache of decoding on the GPU (`shaders/kv_cache.wgsl`): k, v and NOSA's per-key bias
//! for a batch of sequences, their lengths (on the GPU, mirrored on the host), and, for sparse
//! decoding, the selection's pooled keys and pooled eviction scores, extended as each append
//! completes pooling windows (never recomputed from scratch).

use crate::gpu::Encoder;
use std::sync::Arc;

use crate::error::{Error, Result, invalid};
use crate::gpu::{DType, Gpu, Pipeline, PipelineKey, Storage, Tensor};
use crate::ops::launch::{self, Chunk, check_args, input, output, plan_units, window_sized};
use crate::ops::select::{BlockSelect, SelectConfig, SelectScratch};
use crate::problem::{AttnShape, CacheShape, SelectOptions};

const NT: u32 = 64;

crate::gpu::uniform::uniform!(
    "kv_cache.wgsl",
    CacheParams,
    /// Uniform block of `shaders/kv_cache.wgsl`.
    pub(crate) struct CacheParams {
        pub cap: u32,
        pub n_new: u32,
        pub heads_kv: u32,
        pub u0: u32,
        pub units: u32,
        pub batch: u32,
        pub grid_x: u32,
        pub k_off: u32,
        pub n_off: u32,
        pub b_off: u32,
        pub nb_off: u32,
        pub rows: u32,
        pub j0: u32,
        pub n_rows: u32,
        pub _pad0: u32,
        pub _pad1: u32,
        pub _pad2: u32,
    }
);

/// What a [`KvCache`] holds besides k and v.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CacheConfig {
    /// k and v (F32 or F16); the bias and pooled state are f32.
    pub dtype: DType,
    /// A per-key bias (NOSA's eviction score, also its attention bias).
    pub bias: bool,
    /// Keep the pooled state of this selection (sparse decoding); its eviction score is the
    /// bias (NOSA), so `evict > 0` needs `bias`.
    pub select: Option<SelectOptions>,
    /// k, v and the bias in host memory ([`Gpu::empty_host`]): the host store of NOSA's
    /// offloaded cache (`decode::offload`); the lengths and pooled state stay on the GPU.
    pub host_memory: bool,
    /// Keep only the most recent `ring` tokens' k, v and bias (token t in row t % ring), for
    /// the pooled state alone: the staged offloaded cache's GPU side (its store is on the
    /// host). Needs `select`; more rows than a pooling window. Appends longer than the ring
    /// minus a window go in parts.
    pub ring: Option<usize>,
}

impl CacheConfig {
    pub fn new(dtype: DType) -> Self {
        Self {
            dtype,
            bias: false,
            select: None,
            host_memory: false,
            ring: None,
        }
    }
    pub fn ring(self, ring: Option<usize>) -> Self {
        Self { ring, ..self }
    }
    pub fn host_memory(self, host_memory: bool) -> Self {
        Self {
            host_memory,
            ..self
        }
    }
    pub fn bias(self, bias: bool) -> Self {
        Self { bias, ..self }
    }
    pub fn select(self, select: Option<SelectOptions>) -> Self {
        Self { select, ..self }
    }
}

/// A selection over the cache for steps of `n_q` tokens, sharing the cache's pooled state.
#[derive(Debug)]
struct StepSelect {
    n_q: usize,
    op: BlockSelect,
    scratch: SelectScratch,
}

/// KV caches of a batch of sequences on the GPU.
#[derive(Debug)]
pub struct KvCache {
    shape: CacheShape,
    config: CacheConfig,
    storage: Storage,
    /// Rows of k, v and the bias per (sequence, kv head): the capacity, or the ring's.
    rows: usize,
    k: Tensor,
    v: Tensor,
    bias: Option<Tensor>,
    lens: Tensor,
    host_lens: Vec<u32>,
    chunks: Vec<Chunk>,
    append: Arc<Pipeline>,
    grow: Arc<Pipeline>,
    /// Sparse decoding: the op that pools (built for one query head per kv head, n_q = 1)
    /// and the pooled state in its scratch.
    pool: Option<(BlockSelect, SelectScratch)>,
    /// Selection ops per (n_q, heads_q), sharing the pooled state.
    selects: Vec<StepSelect>,
    /// `[batch]` filled with n, for appends of n tokens to every sequence.
    uniform_counts: Vec<(usize, Tensor)>,
}

impl KvCache {
    /// Empty caches (every length 0).
    pub fn new(gpu: &Gpu, shape: CacheShape, config: &CacheConfig) -> Result<Self> {
        shape.validate()?;
        let storage = Storage::for_dtype(gpu, config.dtype)?;
        if let Some(sel) = &config.select {
            if sel.evict > 0 && !config.bias {
                invalid!(
                    "a NOSA selection (evict = {}) ranks blocks by the eviction score: the cache \
                     needs the bias (CacheConfig::bias)",
                    sel.evict
                );
            }
            if !sel.causal {
                invalid!("selection while decoding is causal; these options are not");
            }
        }
        let rows = match (config.ring, config.select) {
            (None, _) => shape.capacity,
            (Some(r), Some(sel)) => {
                let w = crate::problem::pooling(&sel).0;
                if r <= w || r > shape.capacity {
                    invalid!(
                        "a ring of {r} rows: it must hold more than a pooling window ({w}) and at \
                         most the capacity ({})",
                        shape.capacity
                    );
                }
                r
            }
            (Some(_), None) => {
                invalid!("a ring of recent keys serves the pooled state: the cache needs select")
            }
        };
        let (cap, d) = (rows as u64, shape.head_dim as u64);
        let e = config.dtype.size() as u64;
        let chunks = plan_units(
            gpu,
            (shape.batch * shape.heads_kv) as u64,
            &[("cache (k, v)", cap * d * e), ("bias", cap * 4)],
            u32::MAX as u64,
        )?;
        let key = |entry| PipelineKey {
            file: "kv_cache.wgsl",
            entry,
            constants: vec![
                ("D", shape.head_dim as u32),
                ("NT", NT),
                ("HAS_BIAS", config.bias as u32),
            ],
            checked: false,
            storage,
        };
        let alloc = |dims: &[usize], dtype| match config.host_memory {
            true => gpu.empty_host(dims, dtype),
            false => gpu.empty(dims, dtype),
        };
        let dims = [shape.batch, shape.heads_kv, rows, shape.head_dim];
        let mut cache = Self {
            shape,
            config: *config,
            storage,
            rows,
            k: alloc(&dims, config.dtype)?,
            v: alloc(&dims, config.dtype)?,
            bias: match config.bias {
                true => Some(alloc(&dims[..3], DType::F32)?),
                false => None,
            },
            lens: gpu.upload_u32(&[shape.batch], &vec![0; shape.batch])?,
            host_lens: vec![0; shape.batch],
            chunks,
            append: gpu.pipeline(&key("append"))?,
            grow: gpu.pipeline(&key("grow"))?,
            pool: None,
            selects: vec![],
            uniform_counts: vec![],
        };
        if config.select.is_some() {
            let op = cache.select_op(gpu, 1, shape.heads_kv)?;
            let state = op.scratch(gpu)?;
            cache.pool = Some((op, state));
        }
        Ok(cache)
    }

    pub fn shape(&self) -> &CacheShape {
        &self.shape
    }
    pub fn config(&self) -> &CacheConfig {
        &self.config
    }
    /// Tokens held per sequence (the host's mirror of the GPU lengths).
    pub fn lens(&self) -> &[u32] {
        &self.host_lens
    }
    /// k `[batch, heads_kv, rows, head_dim]`: rows = the capacity, or the ring's
    /// ([`CacheConfig::ring`]).
    pub fn k(&self) -> &Tensor {
        &self.k
    }
    pub fn v(&self) -> &Tensor {
        &self.v
    }
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
    /// The lengths on the GPU (u32 `[batch]`), as the decoding kernels read them.
    pub fn lens_tensor(&self) -> &Tensor {
        &self.lens
    }
    /// Bytes of k, v and the bias (in host memory with [`CacheConfig::host_memory`]).
    pub fn store_bytes(&self) -> u64 {
        self.k.size_bytes() + self.v.size_bytes() + self.bias.as_ref().map_or(0, |b| b.size_bytes())
    }

    /// Bytes of GPU memory the cache holds (k, v and the bias unless in host memory, the
    /// lengths, the pooled state and the selection scratch).
    pub fn gpu_bytes(&self) -> u64 {
        let mut n = self.lens.size_bytes();
        if !self.config.host_memory {
            n += self.store_bytes();
        }
        if let Some((_, st)) = &self.pool {
            n += st.block_keys.size_bytes() + st.scores.size_bytes();
            n += st.evict_pooled.as_ref().map_or(0, |t| t.size_bytes());
        }
        n += self
            .selects
            .iter()
            .map(|s| s.scratch.scores.size_bytes())
            .sum::<u64>();
        n
    }

    /// A selection op over the cache for steps of `n_q` tokens with `heads_q` query heads.
    fn select_op(&self, gpu: &Gpu, n_q: usize, heads_q: usize) -> Result<BlockSelect> {
        let Some(opts) = self.config.select else {
            invalid!("this cache keeps no selection state (CacheConfig::select)");
        };
        let s = self.shape;
        let shape = AttnShape {
            batch: s.batch,
            heads_q,
            heads_kv: s.heads_kv,
            seq_q: n_q,
            seq_k: s.capacity,
            head_dim: s.head_dim,
        };
        BlockSelect::new(
            gpu,
            shape,
            &SelectConfig::new(opts)
                .dtype(self.config.dtype)
                .decoding(true)
                .ring(self.config.ring),
        )
    }

    /// Append the first `counts[b]` of the `n` rows of `k_new`, `v_new` `[batch, heads_kv, n,
    /// head_dim]` (and `bias_new` `[batch, heads_kv, n]` when the cache has a bias) to each
    /// sequence, then pool the windows they complete. `counts = None`: all n rows everywhere.
    /// The lengths on the GPU change when `enc` runs; the host's mirror changes now, so record
    /// one append per submission before the steps that read it.
    pub fn append(
        &mut self,
        gpu: &Gpu,
        enc: &mut Encoder,
        k_new: &Tensor,
        v_new: &Tensor,
        bias_new: Option<&Tensor>,
        counts: Option<&[u32]>,
    ) -> Result<()> {
        let s = self.shape;
        let Some(&n) = k_new.shape().get(2) else {
            invalid!(
                "k_new has shape {:?}; expected [batch, heads_kv, n, head_dim]",
                k_new.shape()
            );
        };
        if n == 0 {
            invalid!("appending 0 tokens");
        }
        let counts: Vec<u32> = match counts {
            Some(c) => c.to_vec(),
            None => vec![n as u32; s.batch],
        };
        if counts.len() != s.batch {
            invalid!("{} counts given for a batch of {}", counts.len(), s.batch);
        }
        for (b, (&c, &l)) in counts.iter().zip(&self.host_lens).enumerate() {
            if c as usize > n {
                invalid!("count {c} of sequence {b} exceeds the {n} rows given");
            }
            if l as usize + c as usize > s.capacity {
                return Err(Error::InvalidInput(format!(
                    "sequence {b} holds {l} tokens; {c} more exceed the cache's capacity of {}",
                    s.capacity
                )));
            }
        }
        let dt = self.storage.dtype();
        let nd = [s.batch, s.heads_kv, n, s.head_dim];
        let nbd = [s.batch, s.heads_kv, n];
        let cd = [s.batch, s.heads_kv, self.rows, s.head_dim];
        let (cbd, ld) = ([s.batch, s.heads_kv, self.rows], [s.batch]);
        let mut args = vec![
            input("k_new", k_new, &nd, dt),
            input("v_new", v_new, &nd, dt),
            output("cache k", &self.k, &cd, dt),
            output("cache v", &self.v, &cd, dt),
            output("lens", &self.lens, &ld, DType::U32),
        ];
        match (bias_new, &self.bias) {
            (Some(b), Some(cb)) => {
                args.push(input("bias_new", b, &nbd, DType::F32));
                args.push(output("cache bias", cb, &cbd, DType::F32));
            }
            (None, None) => {}
            (None, Some(_)) => invalid!("this cache holds a bias; append needs bias_new"),
            (Some(_), None) => {
                invalid!("bias_new given to a cache without a bias (CacheConfig::bias)")
            }
        }
        check_args(&args)?;
        // Every decoding step appends the same count everywhere: that tensor is made once.
        let uniform = counts.iter().all(|&c| c as usize == n);
        let tcounts = match self.uniform_counts.iter().find(|(m, _)| *m == n) {
            Some((_, t)) if uniform => t.clone(),
            _ => {
                let t = gpu.upload_u32(&[s.batch], &counts)?;
                if uniform && self.uniform_counts.len() < 4 {
                    self.uniform_counts.push((n, t.clone()));
                }
                t
            }
        };
        // A ring takes the rows in parts: each part's windows (and the window before them)
        // must still be in the ring when they are pooled.
        let part = match (self.config.ring, self.config.select) {
            (Some(r), Some(sel)) => r - crate::problem::pooling(&sel).0,
            _ => n,
        };
        for j0 in (0..n).step_by(part) {
            let rows = part.min(n - j0);
            self.append_part(gpu, enc, k_new, v_new, bias_new, &tcounts, n, (j0, rows))?;
            let got: Vec<u32> = counts
                .iter()
                .map(|&c| (c as usize).clamp(j0, j0 + rows) as u32 - j0 as u32)
                .collect();
            for (l, c) in self.host_lens.iter_mut().zip(&got) {
                *l += c;
            }
            if let Some((op, state)) = &self.pool {
                let n_new = *got.iter().max().expect("batch >= 1") as usize;
                // The bias is NOSA's eviction score when the selection has an eviction stage.
                let evict = match self.config.select.is_some_and(|s| s.evict > 0) {
                    true => self.bias.as_ref(),
                    false => None,
                };
                if n_new > 0 {
                    op.encode_pool(gpu, enc, &self.k, evict, &self.lens, n_new, state)?;
                }
            }
        }
        Ok(())
    }

    /// Rows `part.0 .. part.0 + part.1` of the `n` new rows: append, then grow the lengths.
    #[allow(clippy::too_many_arguments)]
    fn append_part(
        &self,
        gpu: &Gpu,
        enc: &mut Encoder,
        k_new: &Tensor,
        v_new: &Tensor,
        bias_new: Option<&Tensor>,
        tcounts: &Tensor,
        n: usize,
        part: (usize, usize),
    ) -> Result<()> {
        let s = self.shape;
        let (j0, n_rows) = part;
        let align = gpu.limits().min_storage_buffer_offset_alignment as u64;
        let e = self.storage.dtype().size() as u64;
        let (cap, d) = (self.rows as u64, s.head_dim as u64);
        let max_x = gpu.limits().max_compute_workgroups_per_dimension as u64;
        let whole = window_sized(0, s.batch as u64, 256, 4);
        for &c in &self.chunks {
            let units = c.u1 - c.u0;
            let kw = window_sized(c.u0 * cap * d, units * cap * d, align, e);
            let nw = window_sized(c.u0 * n as u64 * d, units * n as u64 * d, align, e);
            let bw = window_sized(c.u0 * cap, units * cap, align, 4);
            let nbw = window_sized(c.u0 * n as u64, units * n as u64, align, 4);
            let wgs = (units * n_rows as u64 * d / 4).div_ceil(NT as u64).max(1);
            let gx = wgs.min(max_x);
            let p = CacheParams {
                cap: s.capacity as u32,
                n_new: n as u32,
                heads_kv: s.heads_kv as u32,
                u0: c.u0 as u32,
                units: units as u32,
                batch: s.batch as u32,
                grid_x: gx as u32,
                k_off: kw.skip,
                n_off: nw.skip,
                b_off: bw.skip,
                nb_off: nbw.skip,
                rows: self.rows as u32,
                j0: j0 as u32,
                n_rows: n_rows as u32,
                ..bytemuck::Zeroable::zeroed()
            };
            let mut views = vec![
                (1, &self.k, kw),
                (2, &self.v, kw),
                (3, k_new, nw),
                (4, v_new, nw),
                (5, &self.lens, whole),
                (6, tcounts, whole),
            ];
            if let (Some(b), Some(cb)) = (bias_new, &self.bias) {
                views.push((7, cb, bw));
                views.push((8, b, nbw));
            }
            launch::dispatch(
                gpu,
                enc,
                &self.append,
                bytemuck::bytes_of(&p),
                &views,
                (gx as u32, wgs.div_ceil(gx) as u32),
            );
        }
        let p = CacheParams {
            cap: s.capacity as u32,
            batch: s.batch as u32,
            j0: j0 as u32,
            n_rows: n_rows as u32,
            ..bytemuck::Zeroable::zeroed()
        };
        launch::dispatch(
            gpu,
            enc,
            &self.grow,
            bytemuck::bytes_of(&p),
            &[(5, &self.lens, whole), (6, tcounts, whole)],
            ((s.batch as u32).div_ceil(NT), 1),
        );
        Ok(())
    }

    /// Make (once) the selection op and scores scratch for steps of `n_q` tokens with `heads_q`
    /// query heads, so that [`Self::gpu_bytes`] counts them before the first step; returns its
    /// index.
    pub fn reserve_select(&mut self, gpu: &Gpu, n_q: usize, heads_q: usize) -> Result<usize> {
        let Some(pool) = &self.pool else {
            invalid!("this cache keeps no selection state (CacheConfig::select)");
        };
        if let Some(i) = self
            .selects
            .iter()
            .position(|x| x.n_q == n_q && x.op.shape().heads_q == heads_q)
        {
            return Ok(i);
        }
        let op = self.select_op(gpu, n_q, heads_q)?;
        let mut scratch = op.scratch(gpu)?;
        // The pooled state is the cache's; the op keeps only its scores scratch.
        scratch.block_keys = pool.1.block_keys.clone();
        scratch.evict_pooled = pool.1.evict_pooled.clone();
        self.selects.push(StepSelect { n_q, op, scratch });
        Ok(self.selects.len() - 1)
    }

    /// Select blocks for the newest `n_q` tokens of each sequence (q `[batch, heads_kv·G, n_q,
    /// head_dim]`) from the pooled state into `out` `[batch, heads_kv, n_q, k]` (u32).
    pub fn select(&mut self, gpu: &Gpu, enc: &mut Encoder, q: &Tensor, out: &Tensor) -> Result<()> {
        if self.pool.is_none() {
            invalid!("this cache keeps no selection state (CacheConfig::select)");
        }
        let s = self.shape;
        let [b, hq, n_q, d] = q.shape() else {
            invalid!(
                "q has shape {:?}; expected [batch, heads_q, n_q, head_dim]",
                q.shape()
            );
        };
        if (*b, *d) != (s.batch, s.head_dim) || !hq.is_multiple_of(s.heads_kv) || *hq == 0 {
            invalid!(
                "q has shape {:?}; this cache takes [{}, a multiple of {}, n_q, {}]",
                q.shape(),
                s.batch,
                s.heads_kv,
                s.head_dim
            );
        }
        for (i, &l) in self.host_lens.iter().enumerate() {
            if (l as usize) < *n_q {
                invalid!("sequence {i} holds {l} tokens, fewer than the {n_q} being decoded");
            }
        }
        let idx = self.reserve_select(gpu, *n_q, *hq)?;
        let st = &self.selects[idx];
        st.op
            .encode_pooled(gpu, enc, q, &self.lens, &st.scratch, out)
    }
}
