//! One attention layer's decoding: its cache (on the GPU or offloaded), the attention that reads
//! it, and the step that ties them (append the new tokens' k, v and bias, select, attend). The
//! model-level decoder (`train::generate`) and `bench decode` both run layers of this.

use crate::decode::attention::{DecodeAttention, DecodeConfig, DecodeInputs};
use crate::decode::cache::{CacheConfig, KvCache};
use crate::decode::offload::{OffloadCache, OffloadConfig, OffloadPath, OffloadStats};
use crate::error::{Result, invalid};
use crate::gpu::Encoder;
use crate::gpu::encoder::BindCache;
use crate::gpu::{DType, Gpu, Tensor};
use crate::ops::attention::AttnOutput;
use crate::ops::select::{BlockSelect, SelectConfig, SelectInputs};
use crate::ops::sparse::{SparseAttention, SparseConfig, SparseInputs};
use crate::problem::{AttnShape, CacheShape, DecodeKeys, SelectOptions};

/// What a [`DecodeLayer`] is built for.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LayerConfig {
    pub cache: CacheShape,
    pub heads_q: usize,
    /// k, v, q and O (F32 or F16).
    pub dtype: DType,
    /// NOSA's per-key bias (attention bias and, with `select.evict > 0`, eviction score).
    pub bias: bool,
    /// Sparse decoding over this selection; `None`: full attention.
    pub select: Option<SelectOptions>,
    /// Offload the cache to host memory with this many GPU slots per (sequence, kv head).
    pub offload_slots: Option<usize>,
    /// How the offloaded cache's blocks reach the GPU.
    pub offload_path: OffloadPath,
    /// Keys per workgroup of the attention (`None`: the library's choice).
    pub split_keys: Option<usize>,
}

impl LayerConfig {
    pub fn new(cache: CacheShape, heads_q: usize, dtype: DType) -> Self {
        Self {
            cache,
            heads_q,
            dtype,
            bias: false,
            select: None,
            offload_slots: None,
            offload_path: OffloadPath::Auto,
            split_keys: None,
        }
    }
}

enum Cache {
    Gpu(Box<KvCache>),
    Offload(Box<OffloadCache>),
}

/// The attention of steps of `n_q` tokens per sequence, its selection and LSE.
struct Step {
    n_q: usize,
    att: DecodeAttention,
    /// The step's selection (sparse with the cache on the GPU) and LSE.
    sel: Option<Tensor>,
    lse: Tensor,
}

/// One layer's decoding state.
pub struct DecodeLayer {
    config: LayerConfig,
    cache: Cache,
    /// Steps of one token first; steps of several (a prompt, cache on the GPU) as they come.
    steps: Vec<Step>,
    /// Every step records the same dispatches on the same buffers: their bind groups are kept.
    binds: BindCache,
}

impl DecodeLayer {
    pub fn new(gpu: &Gpu, c: &LayerConfig) -> Result<Self> {
        let mut cache = match (c.select, c.offload_slots) {
            (None, Some(_)) => {
                invalid!("an offloaded cache serves sparse or NOSA attention, not full attention")
            }
            (Some(s), Some(slots)) => {
                let mut oc = OffloadConfig::new(c.dtype, s, slots).path(c.offload_path);
                oc.bias = c.bias;
                Cache::Offload(Box::new(OffloadCache::new(gpu, c.cache, &oc)?))
            }
            (select, None) => {
                let config = CacheConfig::new(c.dtype).bias(c.bias).select(select);
                Cache::Gpu(Box::new(KvCache::new(gpu, c.cache, &config)?))
            }
        };
        // The one-token step's selection scratch exists from the start, so that the layer's
        // GPU bytes (a budget is sized from them) hold from the first step on.
        match &mut cache {
            Cache::Gpu(k) if c.select.is_some() => {
                k.reserve_select(gpu, 1, c.heads_q)?;
            }
            Cache::Gpu(_) => {}
            Cache::Offload(o) => o.reserve_select(gpu, c.heads_q)?,
        }
        let mut layer = Self {
            config: *c,
            cache,
            steps: vec![],
            binds: BindCache::default(),
        };
        layer.step_for(gpu, 1)?;
        Ok(layer)
    }

    /// The step for `n_q` tokens per sequence, made on first use (several only with the cache
    /// on the GPU).
    fn step_for(&mut self, gpu: &Gpu, n_q: usize) -> Result<usize> {
        if let Some(i) = self.steps.iter().position(|s| s.n_q == n_q) {
            return Ok(i);
        }
        let c = &self.config;
        let step = c.cache.step(c.heads_q, n_q);
        let (att, sel) = match &self.cache {
            Cache::Offload(_) if n_q > 1 => {
                unreachable!("an offloaded cache's prompt goes through Self::prompt")
            }
            Cache::Offload(o) => (o.attention_config(), None),
            Cache::Gpu(_) => {
                let keys = match c.select {
                    Some(s) => DecodeKeys::Sparse {
                        block: s.block,
                        nsel: s.k,
                    },
                    None => DecodeKeys::Full,
                };
                let sel = match c.select {
                    Some(s) => Some(gpu.empty(&step.sel_dims(s.k), DType::U32)?),
                    None => None,
                };
                (DecodeConfig::new(keys).bias(c.bias).dtype(c.dtype), sel)
            }
        };
        self.steps.push(Step {
            n_q,
            att: DecodeAttention::new(gpu, step, &att.split_keys(c.split_keys))?,
            sel,
            lse: gpu.empty(&step.lse_dims(), DType::F32)?,
        });
        Ok(self.steps.len() - 1)
    }

    /// Append tokens without attending (a prompt): see [`KvCache::append`].
    pub fn append(
        &mut self,
        gpu: &Gpu,
        enc: &mut Encoder,
        k: &Tensor,
        v: &Tensor,
        bias: Option<&Tensor>,
        counts: Option<&[u32]>,
    ) -> Result<()> {
        enc.keeping(&self.binds, |enc| match &mut self.cache {
            Cache::Gpu(c) => c.append(gpu, enc, k, v, bias, counts),
            Cache::Offload(c) => c.append(gpu, enc, k, v, bias, counts),
        })
    }

    /// Record one step: the new tokens' k, v `[b, hkv, n, d]` (and bias `[b, hkv, n]`) into
    /// the cache, select (sparse), copy missing blocks (offloaded), attend for q `[b, hq, n, d]`
    /// into `o` (the LSE stays in the layer). Several tokens per sequence (causal among
    /// themselves) with the cache on the GPU; an offloaded cache takes several only as its
    /// first step, a prompt, which the prefill kernels attend (`encode_prompt`).
    #[allow(clippy::too_many_arguments)]
    pub fn encode_step(
        &mut self,
        gpu: &Gpu,
        enc: &mut Encoder,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        bias: Option<&Tensor>,
        o: &Tensor,
    ) -> Result<()> {
        let Some(&n_q) = q.shape().get(2) else {
            invalid!("q has shape {:?}; expected [b, hq, n, d]", q.shape());
        };
        if let Cache::Offload(c) = &self.cache
            && n_q > 1
        {
            if c.lens().iter().any(|&l| l > 0) {
                invalid!(
                    "the offloaded cache decodes one token per sequence per step (its GPU slots \
                     hold one query's blocks); {n_q} were given after the prompt"
                );
            }
            return self.encode_prompt(gpu, enc, q, k, v, bias, o);
        }
        let i = self.step_for(gpu, n_q)?;
        let binds = self.binds.clone();
        enc.keeping(&binds, |enc| {
            self.append(gpu, enc, k, v, bias, None)?;
            let has_bias = self.config.bias;
            let st = &self.steps[i];
            let out = AttnOutput {
                o: o.clone(),
                lse: st.lse.clone(),
            };
            match &mut self.cache {
                Cache::Gpu(c) => {
                    if let Some(sel) = &st.sel {
                        c.select(gpu, enc, q, sel)?;
                    }
                    let x = DecodeInputs::new(q, c.k(), c.v(), c.lens_tensor())
                        .sel(st.sel.as_ref())
                        .bias(if has_bias { c.bias() } else { None });
                    st.att.encode(gpu, enc, &x, &out)
                }
                Cache::Offload(c) => {
                    c.prepare(gpu, enc, q)?;
                    st.att.encode(gpu, enc, &c.inputs(q), &out)
                }
            }
        })
    }

    /// An offloaded cache's first step of several tokens (a prompt): append them (to host
    /// memory), select blocks for every prompt token from the prompt's own keys (and eviction
    /// scores), and attend over them with the block-sparse prefill kernels: the rows decoding
    /// would give one token at a time (tests/decode.rs), at the cost of one pass over the prompt.
    #[allow(clippy::too_many_arguments)]
    fn encode_prompt(
        &mut self,
        gpu: &Gpu,
        enc: &mut Encoder,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        bias: Option<&Tensor>,
        o: &Tensor,
    ) -> Result<()> {
        let n = q.shape()[2];
        let c = self.config;
        let Some(mut opts) = c.select else {
            unreachable!("an offloaded cache always has a selection (DecodeLayer::new)");
        };
        let shape = AttnShape {
            batch: c.cache.batch,
            heads_q: c.heads_q,
            heads_kv: c.cache.heads_kv,
            seq_q: n,
            seq_k: n,
            head_dim: c.cache.head_dim,
        };
        // A prompt of fewer blocks than the budget attends to all of them (as decoding does
        // while the sequence is short).
        let nb = n.div_ceil(opts.block);
        if nb <= opts.k {
            opts = SelectOptions {
                k: nb,
                n_init: 0,
                n_local: 0,
                evict: 0,
                ..opts
            };
        }
        // Made for this prompt and let go after it: the scores scratch alone is 4 bytes per
        // (sequence, kv head, token, pooled key), far more than the cache's GPU slots. wgpu
        // keeps the buffers until the recorded work has run.
        let select = BlockSelect::new(gpu, shape, &SelectConfig::new(opts).dtype(c.dtype))?;
        let att = SparseAttention::new(
            gpu,
            shape,
            &SparseConfig::for_selection(&opts)
                .bias(c.bias)
                .dtype(c.dtype),
        )?;
        let scratch = select.scratch(gpu)?;
        let sel = gpu.empty(&select.selection_dims(), DType::U32)?;
        let lse = gpu.empty(&shape.lse_dims(), DType::F32)?;
        self.append(gpu, enc, k, v, bias, None)?;
        let evict = match opts.evict > 0 {
            true => bias,
            false => None,
        };
        select.encode(
            gpu,
            enc,
            &SelectInputs::new(q, k).evict(evict),
            &scratch,
            &sel,
        )?;
        att.encode_forward(
            gpu,
            enc,
            &SparseInputs::new(q, k, v, &sel).bias(if c.bias { bias } else { None }),
            &AttnOutput { o: o.clone(), lse },
        )
    }

    /// Bind groups the layer keeps for its steps (each step's dispatches find theirs here
    /// instead of making them: ~2.5 of a small dispatch's ~13 us of host time on the H200).
    pub fn kept_bind_groups(&self) -> usize {
        self.binds.len()
    }

    /// Does the cache take several tokens per step (on the GPU; not offloaded)?
    pub fn takes_many(&self) -> bool {
        matches!(self.cache, Cache::Gpu(_))
    }

    /// Bytes of the cache on the GPU and in host memory.
    pub fn kv_bytes(&self) -> (u64, u64) {
        match &self.cache {
            Cache::Gpu(c) => (c.gpu_bytes(), 0),
            Cache::Offload(c) => (c.gpu_bytes(), c.host_bytes()),
        }
    }

    /// The offloaded cache's host -> GPU path; `None` with the cache on the GPU.
    pub fn offload_path(&self) -> Option<OffloadPath> {
        match &self.cache {
            Cache::Offload(c) => Some(c.path()),
            Cache::Gpu(_) => None,
        }
    }

    /// The offloaded cache's counters (a sync point); `None` with the cache on the GPU.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn offload_stats(&self, gpu: &Gpu) -> Result<Option<OffloadStats>> {
        match &self.cache {
            Cache::Gpu(_) => Ok(None),
            Cache::Offload(c) => c.stats(gpu).map(Some),
        }
    }

    /// [`Self::offload_stats`] without blocking (the browser's way).
    pub async fn offload_stats_async(&self, gpu: &Gpu) -> Result<Option<OffloadStats>> {
        match &self.cache {
            Cache::Gpu(_) => Ok(None),
            Cache::Offload(c) => c.stats_async(gpu).await.map(Some),
        }
    }

    /// Zero the offloaded cache's counters (nothing on the GPU).
    pub fn reset_stats(&self, gpu: &Gpu) -> Result<()> {
        match &self.cache {
            Cache::Gpu(_) => Ok(()),
            Cache::Offload(c) => c.reset_stats(gpu),
        }
    }
}
