//! Text generation from a trained model with a KV cache (`decode`): the model's forward for
//! one new token per sequence runs on the GPU, each layer's attention through one stateful
//! backend op (`AttnBackend::sa_decode`) that appends the token's k, v (and NOSA's bias) to the
//! layer's cache, selects (sparse, NOSA) and attends with the decoding kernels; the cache is on
//! the GPU or offloaded to host memory NOSA's way. Sampling (temperature, top-p) runs on the
//! GPU too: only the sampled tokens come back.
//!
//! The prompt is fed through the same step, one token at a time (prefill and decoding select
//! identically, so this is exact; a batched prefill would be faster on long prompts).

use std::sync::{Arc, Mutex, MutexGuard};

use burn::tensor::activation::softmax;
use burn::tensor::{Device, Int, Tensor as BTensor, TensorData};

use crate::decode::{DecodeLayer, LayerConfig, OffloadConfig, OffloadPath, OffloadStats};
use crate::error::{Error, Result, invalid};
use crate::gpu::{DType, Gpu};
use crate::problem::{CacheShape, SelectOptions};
use crate::reference::Rng;
use crate::train::bridge::Runtime;
use crate::train::model::{Lm, LmConfig};

/// Which keys each new token attends to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attention {
    /// Every cached key.
    Full,
    /// The blocks the model's selector picks by the query (its scoring, forced blocks, budget;
    /// no eviction stage).
    Sparse,
    /// NOSA's selection: the query-aware blocks, then the rest by the eviction head's score
    /// (models trained with one).
    Nosa,
}

impl Attention {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "full" => Ok(Attention::Full),
            "sparse" => Ok(Attention::Sparse),
            "nosa" => Ok(Attention::Nosa),
            _ => invalid!("unknown attention `{s}` (expected full, sparse or nosa)"),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Attention::Full => "full",
            Attention::Sparse => "sparse",
            Attention::Nosa => "nosa",
        }
    }
}

/// How a [`Decoder`] runs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GenerateOptions {
    pub attention: Attention,
    /// Blocks kept per step (the model's `topk` when `None`).
    pub budget: Option<usize>,
    /// Keep the caches in host memory with this many GPU slots (blocks) per (sequence, kv
    /// head) (sparse and NOSA attention only).
    pub offload_slots: Option<usize>,
    /// Offloaded: the GPU bytes the caches may take in all (slots, pooled selection state,
    /// lists): the slots are then as many as fit (at least the selection's k; a smaller budget
    /// is an error that names the least). `None`: `offload_slots` as given.
    pub gpu_kv_budget: Option<u64>,
    /// How the offloaded caches' blocks reach the GPU.
    pub offload_path: OffloadPath,
    /// Sequences decoded together.
    pub batch: usize,
    /// Tokens each sequence may hold (prompt + generated).
    pub capacity: usize,
}

impl GenerateOptions {
    pub fn new(attention: Attention, capacity: usize) -> Self {
        Self {
            attention,
            budget: None,
            offload_slots: None,
            gpu_kv_budget: None,
            offload_path: OffloadPath::Auto,
            batch: 1,
            capacity,
        }
    }
}

/// Prompt tokens per sequence that [`Decoder::feed`] takes through the layers at once.
pub const PREFILL_CHUNK: usize = 64;

/// A layer's decoding state as the backend op carries it (shared, locked per step).
#[derive(Clone)]
pub struct DecodeCfg(Arc<Mutex<DecodeLayer>>);

impl std::fmt::Debug for DecodeCfg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DecodeCfg({:p})", Arc::as_ptr(&self.0))
    }
}

impl DecodeCfg {
    pub(crate) fn lock(&self) -> MutexGuard<'_, DecodeLayer> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Generates with a trained model: feed one token per sequence, get the next token's logits.
pub struct Decoder {
    model: Lm,
    cfg: LmConfig,
    device: Device,
    gpu: Arc<Gpu>,
    layers: Vec<DecodeCfg>,
    batch: usize,
    capacity: usize,
    pos: usize,
}

impl Decoder {
    pub fn new(rt: &Runtime, model: Lm, cfg: &LmConfig, opts: &GenerateOptions) -> Result<Self> {
        let gpu = rt.gpu.clone();
        let cfg = match opts.budget {
            Some(k) => cfg.with_topk(k),
            None => cfg.clone(),
        };
        cfg.validate()?;
        if opts.batch == 0 || opts.capacity == 0 {
            invalid!("a decoder needs a batch and a capacity of at least 1");
        }
        if opts.capacity > cfg.max_seq {
            invalid!(
                "{} tokens per sequence exceed the model's max_seq {} (its RoPE table)",
                opts.capacity,
                cfg.max_seq
            );
        }
        let bias = cfg.has_evict_head();
        let select: Option<SelectOptions> = match opts.attention {
            Attention::Full => None,
            Attention::Sparse => Some(SelectOptions {
                evict: 0,
                ..cfg.select_options()
            }),
            Attention::Nosa => {
                if !bias {
                    invalid!(
                        "NOSA attention needs a model trained with NOSA's eviction head \
                         (train --mode nosa); use --attention sparse or full"
                    );
                }
                Some(cfg.select_options())
            }
        };
        let block = cfg.block;
        // Room for the budget's blocks (a short sequence attends to all of its blocks).
        let mut capacity = opts.capacity.next_multiple_of(block);
        if let Some(s) = &select {
            capacity = capacity.max(s.k * block);
        }
        let shape = CacheShape {
            batch: opts.batch,
            heads_kv: cfg.heads_kv,
            capacity,
            head_dim: cfg.head_dim(),
        };
        let mut layer = LayerConfig {
            bias,
            select,
            offload_slots: opts.offload_slots,
            offload_path: opts.offload_path,
            ..LayerConfig::new(shape, cfg.heads_q, DType::F32)
        };
        if let Some(budget) = opts.gpu_kv_budget {
            let (Some(_), Some(s)) = (layer.offload_slots, &select) else {
                invalid!(
                    "a GPU KV budget sizes an offloaded cache's slots: offload the cache \
                     (offload_slots) with sparse or NOSA attention"
                );
            };
            // One layer with the fewest slots gives the part that does not grow with them.
            let fewest = LayerConfig {
                offload_slots: Some(s.k),
                ..layer
            };
            let least = DecodeLayer::new(&gpu, &fewest)?.kv_bytes().0 * cfg.layers as u64;
            // Each slot: a block of k, v (and bias) and its bookkeeping, per (sequence, kv head).
            let per_slot = (OffloadConfig::slot_bytes(DType::F32, block, cfg.head_dim(), bias)
                + OffloadConfig::SLOT_STATE_BYTES)
                * (opts.batch * cfg.heads_kv * cfg.layers) as u64;
            if budget < least {
                invalid!(
                    "a GPU KV budget of {:.2} MB is below the least this offloaded cache takes: \
                     {:.2} MB ({} slots per (sequence, kv head), one step's selection)",
                    budget as f64 / 1e6,
                    least as f64 / 1e6,
                    s.k
                );
            }
            let more = ((budget - least) / per_slot) as usize;
            layer.offload_slots = Some((s.k + more).min(capacity / block));
        }
        let layers = (0..cfg.layers)
            .map(|_| {
                Ok(DecodeCfg(Arc::new(Mutex::new(DecodeLayer::new(
                    &gpu, &layer,
                )?))))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            model,
            cfg,
            device: rt.device.clone(),
            gpu,
            layers,
            batch: opts.batch,
            capacity: opts.capacity,
            pos: 0,
        })
    }

    /// Tokens fed so far per sequence.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Feed `n` tokens per sequence (`tokens` batch-major, `[batch][n]`: a prompt); returns
    /// the logits after each of them `[batch, n, vocab]` (on the GPU). With the caches on the
    /// GPU the tokens go through the layers PREFILL_CHUNK at a time (causal among themselves:
    /// the same logits as one at a time). Offloaded caches take a prompt (the first tokens)
    /// whole, attended by the prefill kernels while its k and v go to host memory (NOSA's
    /// prefill: no GPU slot holds it), and later tokens one at a time.
    pub fn feed(&mut self, tokens: &[u32], n: usize) -> Result<BTensor<3>> {
        self.feed_logits(tokens, n, false)
    }

    fn feed_logits(&mut self, tokens: &[u32], n: usize, last_only: bool) -> Result<BTensor<3>> {
        if n == 0 || tokens.len() != self.batch * n {
            invalid!(
                "{} tokens given for {} sequences of {n}",
                tokens.len(),
                self.batch
            );
        }
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= self.cfg.vocab) {
            invalid!("token {t} is outside the vocabulary of {}", self.cfg.vocab);
        }
        if self.pos + n > self.capacity {
            invalid!(
                "the sequences hold {} tokens; {n} more exceed their capacity of {}",
                self.pos,
                self.capacity
            );
        }
        let chunk = match self.layers.iter().all(|l| l.lock().takes_many()) {
            true => PREFILL_CHUNK,
            false if self.pos == 0 => n,
            false => 1,
        };
        let mut out = vec![];
        for j0 in (0..n).step_by(chunk) {
            let m = chunk.min(n - j0);
            let ids: Vec<i64> = (0..self.batch)
                .flat_map(|b| tokens[b * n + j0..b * n + j0 + m].iter().map(|&t| t as i64))
                .collect();
            let t =
                BTensor::<2, Int>::from_data(TensorData::new(ids, [self.batch, m]), &self.device);
            // Only the last chunk's last logits are kept then: no chunk computes more.
            let logits = self
                .model
                .decode_step(&self.cfg, t, self.pos, &self.layers, last_only)?;
            if !last_only || j0 + m == n {
                out.push(logits);
            }
            self.pos += m;
        }
        Ok(BTensor::cat(out, 1))
    }

    /// [`Self::feed`] returning only the logits after the last token `[batch, vocab]`: the
    /// next token's, after a prompt.
    pub fn prefill(&mut self, tokens: &[u32], n: usize) -> Result<BTensor<2>> {
        let l = self.feed_logits(tokens, n, true)?;
        let [b, _, v] = l.dims();
        Ok(l.reshape([b, v]))
    }

    /// Feed one token per sequence; returns the logits of the next token `[batch, vocab]`
    /// (on the GPU).
    pub fn step(&mut self, tokens: &[u32]) -> Result<BTensor<2>> {
        if tokens.len() != self.batch {
            invalid!(
                "{} tokens given for a batch of {}",
                tokens.len(),
                self.batch
            );
        }
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= self.cfg.vocab) {
            invalid!("token {t} is outside the vocabulary of {}", self.cfg.vocab);
        }
        if self.pos >= self.capacity {
            invalid!("the sequences are full: {} tokens", self.capacity);
        }
        Ok(self.feed(tokens, 1)?.reshape([self.batch, self.cfg.vocab]))
    }

    /// `max_new` tokens after each of `prompts` (one per sequence of the batch, of any lengths
    /// from 1), sampled by `sampler`; returns each sequence's new tokens. Prompts of different
    /// lengths share the decoder's positions: the shortest length goes in as one prefill, then
    /// every sequence takes one token a step, the rest of its prompt while it lasts (what was
    /// sampled for it is dropped) and its own samples after, so that a prompt's greedy
    /// continuation is the one it gets decoded alone (to float tolerance).
    pub fn generate(
        &mut self,
        prompts: &[&[u32]],
        max_new: usize,
        sampler: &mut Sampler,
    ) -> Result<Vec<Vec<u32>>> {
        self.generate_by(prompts, max_new, |logits| sampler.sample(logits))
    }

    /// [`Self::generate`] with the choice of tokens made by `pick` (one token per sequence from
    /// the logits `[batch, vocab]` of each step, including the steps whose samples are dropped
    /// because a sequence is still in its prompt).
    pub fn generate_by(
        &mut self,
        prompts: &[&[u32]],
        max_new: usize,
        mut pick: impl FnMut(BTensor<2>) -> Result<Vec<u32>>,
    ) -> Result<Vec<Vec<u32>>> {
        if prompts.len() != self.batch {
            invalid!(
                "{} prompts given for a batch of {}",
                prompts.len(),
                self.batch
            );
        }
        if max_new == 0 {
            invalid!("generate at least 1 token (max_new is 0)");
        }
        let (Some(short), Some(long)) = (
            prompts.iter().map(|p| p.len()).min(),
            prompts.iter().map(|p| p.len()).max(),
        ) else {
            invalid!("no prompts given");
        };
        if short == 0 {
            invalid!("every prompt needs at least one token");
        }
        // The longest prompt's last sample comes after feeding long + max_new - 1 tokens.
        let need = self.pos + long + max_new - 1;
        if need > self.capacity {
            invalid!(
                "{} tokens held, prompts of up to {long} and {max_new} new tokens need {need} \
                 positions; the decoder's capacity is {}",
                self.pos,
                self.capacity
            );
        }
        let first: Vec<u32> = prompts.iter().flat_map(|p| &p[..short]).copied().collect();
        let mut logits = self.prefill(&first, short)?;
        let mut out = vec![Vec::with_capacity(max_new); self.batch];
        for t in short.. {
            let sampled = pick(logits)?;
            if sampled.len() != self.batch {
                invalid!(
                    "{} tokens picked for a batch of {}",
                    sampled.len(),
                    self.batch
                );
            }
            for ((o, p), &s) in out.iter_mut().zip(prompts).zip(&sampled) {
                if t >= p.len() && o.len() < max_new {
                    o.push(s);
                }
            }
            if out.iter().all(|o| o.len() == max_new) {
                break;
            }
            let next: Vec<u32> = prompts
                .iter()
                .zip(&sampled)
                .map(|(p, &s)| p.get(t).copied().unwrap_or(s))
                .collect();
            logits = self.step(&next)?;
        }
        Ok(out)
    }

    /// GPU and host bytes of the caches of every layer.
    pub fn kv_bytes(&self) -> (u64, u64) {
        self.layers.iter().fold((0, 0), |(g, h), l| {
            let (a, b) = l.lock().kv_bytes();
            (g + a, h + b)
        })
    }

    /// Offloaded caches: how their blocks reach the GPU; `None` with the caches on the GPU.
    pub fn offload_path(&self) -> Option<OffloadPath> {
        self.layers.first().and_then(|l| l.lock().offload_path())
    }

    /// Offloaded caches: the counters of every layer summed (a sync point); `None` otherwise.
    pub fn offload_stats(&self) -> Result<Option<OffloadStats>> {
        let mut total: Option<OffloadStats> = None;
        for l in &self.layers {
            if let Some(s) = l.lock().offload_stats(&self.gpu)? {
                *total.get_or_insert_with(OffloadStats::default) += s;
            }
        }
        Ok(total)
    }

    /// Offloaded caches: zero the counters of every layer (e.g. after a prompt, whose first
    /// step finds no block on the GPU); nothing otherwise.
    pub fn reset_offload_stats(&self) -> Result<()> {
        self.layers
            .iter()
            .try_for_each(|l| l.lock().reset_stats(&self.gpu))
    }
}

/// Temperature and top-p (nucleus) sampling on the GPU; temperature 0 is greedy.
pub struct Sampler {
    pub temperature: f64,
    pub top_p: f64,
    rng: Rng,
}

impl Sampler {
    pub fn new(temperature: f64, top_p: f64, seed: u64) -> Result<Self> {
        if !(temperature.is_finite() && temperature >= 0.0) {
            invalid!("temperature must be a finite number >= 0, got {temperature}");
        }
        if !(top_p > 0.0 && top_p <= 1.0) {
            invalid!("top-p must be in (0, 1], got {top_p}");
        }
        Ok(Self {
            temperature,
            top_p,
            rng: Rng::new(seed),
        })
    }

    /// One token per row of `logits` `[batch, vocab]`.
    pub fn sample(&mut self, logits: BTensor<2>) -> Result<Vec<u32>> {
        let [b, vocab] = logits.dims();
        let device = logits.device();
        let ids = if self.temperature == 0.0 {
            logits.argmax(1)
        } else {
            let probs = softmax(logits / self.temperature, 1);
            let (sorted, idx) = probs.sort_descending_with_indices(1);
            // Keep the smallest head of the sorted distribution whose mass reaches top-p (a
            // token stays when the mass before it is below p; the first always does).
            let cum = sorted.clone().cumsum(1);
            let before = cum - sorted.clone();
            let kept = sorted * before.lower_elem(self.top_p).float();
            let cm = kept.clone().cumsum(1);
            let total = kept.sum_dim(1);
            // Inverse CDF at u ~ U(0, 1) per row (drawn here: reproducible with the seed).
            let u: Vec<f32> = (0..b).map(|_| self.rng.uniform() as f32).collect();
            let u = BTensor::<2>::from_data(TensorData::new(u, [b, 1]), &device) * total;
            let pos = cm.lower_equal(u.expand([b, vocab])).int().sum_dim(1);
            let pos = pos.clamp_max(vocab as i64 - 1);
            idx.gather(1, pos)
        };
        let data = ids.into_data();
        let v: Vec<i64> = data
            .convert::<i64>()
            .try_into_vec::<i64>()
            .map_err(|e| Error::Gpu(format!("reading sampled tokens back: {e:?}")))?;
        Ok(v.into_iter().map(|x| x as u32).collect())
    }
}
