//! The problem description every layer shares: attention shapes and options, the selection
//! contract (block sizes, sentinel, scoring and pooling) and the sparse options, with ALL their
//! validation. The GPU ops, the f64 references, the Burn ops and the CLI describe a problem with
//! these types and check it here, once.

use crate::error::{Result, invalid};

/// Head dimensions the kernels take: multiples of 16 from 16 to 256 (part of
/// [`AttnShape::validate`]).
pub fn head_dim_supported(d: usize) -> bool {
    (16..=256).contains(&d) && d.is_multiple_of(16)
}

/// [`head_dim_supported`] as an error that says the rule: the one place it is worded.
pub fn check_head_dim(d: usize) -> Result<()> {
    if !head_dim_supported(d) {
        invalid!(
            "head_dim = {d} is not supported: the kernels take multiples of 16 from 16 to 256"
        );
    }
    Ok(())
}

/// Shape of one attention problem. Tensors are `[batch, heads, seq, head_dim]`, row-major.
/// Query head `h` reads key/value head `h / (heads_q / heads_kv)` (grouped-query attention).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AttnShape {
    pub batch: usize,
    pub heads_q: usize,
    pub heads_kv: usize,
    pub seq_q: usize,
    pub seq_k: usize,
    pub head_dim: usize,
}

/// Options shared by every attention op.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnOptions {
    /// Mask by absolute position: query `i` sits at position `seq_k - seq_q + i` and sees keys
    /// `0..=` that position (so decoding with a short query block works).
    pub causal: bool,
    /// Logit scale; `None` means `1/sqrt(head_dim)`.
    pub scale: Option<f32>,
}

impl Default for AttnOptions {
    fn default() -> Self {
        Self {
            causal: true,
            scale: None,
        }
    }
}

impl AttnOptions {
    pub fn causal(causal: bool) -> Self {
        Self {
            causal,
            scale: None,
        }
    }
    pub fn scale_for(&self, head_dim: usize) -> f32 {
        self.scale.unwrap_or(1.0 / (head_dim as f32).sqrt())
    }
}

impl AttnShape {
    /// Self-attention shape (seq_q == seq_k).
    pub fn new(batch: usize, heads_q: usize, heads_kv: usize, seq: usize, head_dim: usize) -> Self {
        Self {
            batch,
            heads_q,
            heads_kv,
            seq_q: seq,
            seq_k: seq,
            head_dim,
        }
    }

    pub fn group(&self) -> usize {
        self.heads_q / self.heads_kv
    }
    pub fn q_dims(&self) -> [usize; 4] {
        [self.batch, self.heads_q, self.seq_q, self.head_dim]
    }
    pub fn kv_dims(&self) -> [usize; 4] {
        [self.batch, self.heads_kv, self.seq_k, self.head_dim]
    }
    pub fn lse_dims(&self) -> [usize; 3] {
        [self.batch, self.heads_q, self.seq_q]
    }
    pub fn q_len(&self) -> usize {
        self.q_dims().iter().product()
    }
    pub fn kv_len(&self) -> usize {
        self.kv_dims().iter().product()
    }
    pub fn lse_len(&self) -> usize {
        self.lse_dims().iter().product()
    }

    /// First position (in key coordinates) of query 0.
    pub fn q_offset(&self) -> usize {
        self.seq_k.saturating_sub(self.seq_q)
    }

    /// Checks every backend needs: non-empty, GQA divisibility, causal geometry.
    pub fn validate(&self, opts: &AttnOptions) -> Result<()> {
        let s = self;
        for (name, v) in [
            ("batch", s.batch),
            ("heads_q", s.heads_q),
            ("heads_kv", s.heads_kv),
            ("seq_q", s.seq_q),
            ("seq_k", s.seq_k),
            ("head_dim", s.head_dim),
        ] {
            if v == 0 {
                invalid!("{name} is 0: every dimension of an attention problem must be at least 1");
            }
        }
        check_head_dim(s.head_dim)?;
        for (name, dims) in [("q", s.q_dims()), ("k and v", s.kv_dims())] {
            // Bytes of an f32 tensor must be addressable (a product that wraps would describe
            // a small tensor under a large shape).
            if dims
                .iter()
                .try_fold(4usize, |a, &d| a.checked_mul(d))
                .is_none()
            {
                invalid!(
                    "{name} of shape {dims:?} would hold more bytes than this machine can address"
                );
            }
        }
        if !s.heads_q.is_multiple_of(s.heads_kv) {
            invalid!(
                "heads_q = {} is not a multiple of heads_kv = {} (grouped-query attention needs \
                 each key/value head to serve a whole number of query heads)",
                s.heads_q,
                s.heads_kv
            );
        }
        if opts.causal && s.seq_q > s.seq_k {
            invalid!(
                "causal attention with seq_q = {} > seq_k = {}: queries sit at the end of the key \
                 range, so the first {} queries would see no key",
                s.seq_q,
                s.seq_k,
                s.seq_q - s.seq_k
            );
        }
        if let Some(scale) = opts.scale
            && !(scale.is_finite() && scale > 0.0)
        {
            invalid!("scale must be a finite positive number, got {scale}");
        }
        Ok(())
    }

    /// Number of (query, key) pairs that take part, summed over batch and query heads.
    pub fn visible_pairs(&self, causal: bool) -> u64 {
        let per_head: u64 = if causal {
            let off = self.q_offset();
            (0..self.seq_q)
                .map(|i| (off + i + 1).min(self.seq_k) as u64)
                .sum()
        } else {
            (self.seq_q * self.seq_k) as u64
        };
        per_head * (self.batch * self.heads_q) as u64
    }

    /// Forward FLOPs: two matrix products of 2·d FLOPs per visible pair (QKᵀ and PV).
    pub fn forward_flops(&self, causal: bool) -> f64 {
        4.0 * self.head_dim as f64 * self.visible_pairs(causal) as f64
    }

    /// Backward FLOPs by the FlashAttention convention: 2.5x forward (five matrix products:
    /// QKᵀ recomputed, dO·Vᵀ, Pᵀ·dO, dSᵀ·Q, dS·K).
    pub fn backward_flops(&self, causal: bool) -> f64 {
        2.5 * self.forward_flops(causal)
    }
}

// ---- Block selection: the contract between the selector and the sparse kernels ----

/// [`BLOCK_SIZES`] as an error that names them: the one place the rule is worded.
pub fn check_block_size(block: usize) -> Result<()> {
    if !BLOCK_SIZES.contains(&block) {
        invalid!("block size {block} is not supported (supported: {BLOCK_SIZES:?})");
    }
    Ok(())
}

/// Marks an unused slot of a selection (fewer than k candidate blocks).
pub const SENTINEL: u32 = u32::MAX;

/// Block sizes the kernels take.
pub const BLOCK_SIZES: [usize; 4] = [16, 32, 64, 128];

/// How blocks are scored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scoring {
    /// Sum over the group's query heads of the softmax over candidate blocks (SSA, NSA).
    Ssa,
    /// Sum over the group's query heads of the scaled dot product (MoBA-style).
    Moba,
    /// InfLLM-V2: SSA scores of 32-token pooled keys at stride 16, max over a block's kernels.
    InfLlmV2,
}

impl Scoring {
    /// `ssa`, `moba`, `infllm-v2`: the names the CLI, the page and the JSON records use.
    pub fn name(self) -> &'static str {
        match self {
            Scoring::Ssa => "ssa",
            Scoring::Moba => "moba",
            Scoring::InfLlmV2 => "infllm-v2",
        }
    }

    /// The scoring named `s` (see [`Scoring::name`]).
    pub fn parse(s: &str) -> Result<Scoring> {
        match s {
            "ssa" => Ok(Scoring::Ssa),
            "moba" => Ok(Scoring::Moba),
            "infllm-v2" => Ok(Scoring::InfLlmV2),
            _ => invalid!("unknown scoring `{s}` (expected ssa, moba or infllm-v2)"),
        }
    }
}

/// Key pooling of a scoring mode: (window, stride) in tokens.
pub fn pooling(opts: &SelectOptions) -> (usize, usize) {
    match opts.scoring {
        Scoring::InfLlmV2 => (32, 16),
        Scoring::Ssa | Scoring::Moba => (opts.block, opts.block),
    }
}

/// Number of pooled keys over `seq_k` tokens.
pub fn pooled_len(opts: &SelectOptions, seq_k: usize) -> usize {
    seq_k.div_ceil(pooling(opts).1)
}

/// Pooled keys a block overlaps: `lo..=hi` (clamped to the `np` pooled keys).
pub fn block_kernels(opts: &SelectOptions, np: usize, j: usize) -> (usize, usize) {
    let (w, st) = pooling(opts);
    let start = j * opts.block;
    let lo = if start >= w { (start - w) / st + 1 } else { 0 };
    let hi = ((j + 1) * opts.block).div_ceil(st).min(np) - 1;
    (lo, hi)
}

/// What to select.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SelectOptions {
    pub block: usize,
    /// Blocks kept per (token, kv head), forced ones included.
    pub k: usize,
    /// Forced initial ("sink") blocks.
    pub n_init: usize,
    /// Forced local blocks right before the current one.
    pub n_local: usize,
    pub scoring: Scoring,
    pub causal: bool,
    /// Logit scale; `None` means 1/sqrt(head_dim).
    pub scale: Option<f32>,
    /// NOSA (NOSA.md §2): of the k blocks, this many are chosen by a query-agnostic eviction
    /// score (pooled like the keys) after the query-aware top-(k − evict) with the forced
    /// blocks; 0: every block by the query.
    pub evict: usize,
}

impl SelectOptions {
    /// SSA's defaults: B = 16, k = 16, no forced blocks besides the current one.
    pub fn ssa() -> Self {
        Self {
            block: 16,
            k: 16,
            n_init: 0,
            n_local: 0,
            scoring: Scoring::Ssa,
            causal: true,
            scale: None,
            evict: 0,
        }
    }

    /// NOSA's official budget (NOSA.md §2): blocks of 64, k = 64 = 1 init + 16 local (15 before
    /// the current block, and the current one) + 16 by the query + 31 by the eviction score,
    /// InfLLM-V2 scoring.
    pub fn nosa() -> Self {
        Self::nosa_budget(64, 64, 1, 15, 16).expect("the official budget fits")
    }

    /// A NOSA budget: `k` blocks of `block` tokens = `n_init` initial + `n_local` local + the
    /// current block + `k_query` chosen by the query + the rest by the eviction score.
    /// An error names the numbers when they do not fit (the rest, k against the blocks and the
    /// block size, `validate` checks against a shape).
    pub fn nosa_budget(
        block: usize,
        k: usize,
        n_init: usize,
        n_local: usize,
        k_query: usize,
    ) -> Result<Self> {
        let forced = n_init + n_local + 1;
        if forced + k_query > k {
            invalid!(
                "k_query ({k_query}) + the forced blocks ({n_init} initial + {n_local} local + \
                 the current one = {forced}) = {} exceed k = {k}",
                forced + k_query
            );
        }
        check_block_size(block)?;
        Ok(Self {
            block,
            k,
            n_init,
            n_local,
            scoring: Scoring::InfLlmV2,
            causal: true,
            scale: None,
            evict: k - forced - k_query,
        })
    }

    /// Blocks the query-aware stage keeps (forced ones included).
    pub fn query_k(&self) -> usize {
        self.k - self.evict.min(self.k)
    }

    /// The attention options of the selection (mask and scale).
    pub fn attn(&self) -> AttnOptions {
        AttnOptions {
            causal: self.causal,
            scale: self.scale,
        }
    }

    /// What the sparse attention over this selection needs: the one conversion.
    pub fn sparse(&self) -> SparseOptions {
        SparseOptions {
            block: self.block,
            causal: self.causal,
            scale: self.scale,
        }
    }

    pub fn blocks(&self, seq_k: usize) -> usize {
        seq_k.div_ceil(self.block)
    }

    /// Checks shared by the reference and the GPU launcher.
    pub fn validate(&self, shape: &AttnShape) -> Result<()> {
        shape.validate(&self.attn())?;
        check_block_size(self.block)?;
        let nb = self.blocks(shape.seq_k);
        if self.k == 0 {
            invalid!("k = 0: the selection must keep at least one block");
        }
        if self.k > nb {
            invalid!(
                "k = {} is larger than the {nb} blocks of {} keys at block size {}",
                self.k,
                shape.seq_k,
                self.block
            );
        }
        if self.n_init + self.n_local + 1 > self.k {
            invalid!(
                "n_init ({}) + n_local ({}) + the current block exceed k = {}",
                self.n_init,
                self.n_local,
                self.k
            );
        }
        if self.evict > 0 && self.n_init + self.n_local + 1 + self.evict > self.k {
            invalid!(
                "n_init ({}) + n_local ({}) + the current block + evict ({}) = {} exceed k = {}: \
                 the blocks chosen by the eviction score come on top of the forced ones",
                self.n_init,
                self.n_local,
                self.evict,
                self.n_init + self.n_local + 1 + self.evict,
                self.k
            );
        }
        Ok(())
    }
}

/// What the sparse stream needs besides the shape: the block size the selection refers to.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SparseOptions {
    pub block: usize,
    pub causal: bool,
    /// Logit scale; `None` means 1/sqrt(head_dim).
    pub scale: Option<f32>,
}

impl SparseOptions {
    pub fn attn(&self) -> AttnOptions {
        AttnOptions {
            causal: self.causal,
            scale: self.scale,
        }
    }

    pub fn validate(&self, shape: &AttnShape, nsel: usize) -> Result<()> {
        shape.validate(&self.attn())?;
        check_block_size(self.block)?;
        if nsel == 0 {
            invalid!("a selection of 0 blocks per token attends to nothing");
        }
        Ok(())
    }
}

// ---- Decoding: a few new query tokens against a KV cache ----

/// Shape of one decoding step over a batch of KV caches. The caches are
/// `[batch, heads_kv, capacity, head_dim]`; sequence `b` holds `len[b]` tokens (its first
/// `len[b]` rows), the last `n_q` of which are the new tokens whose queries
/// (`[batch, heads_q, n_q, head_dim]`) attend: query `i` sits at position `len[b] − n_q + i`
/// and sees the keys at or before it (causal by absolute position, as prefill).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DecodeShape {
    pub batch: usize,
    pub heads_q: usize,
    pub heads_kv: usize,
    /// New tokens per sequence in this step (1 for plain decoding).
    pub n_q: usize,
    /// Token rows of each (sequence, kv head) cache.
    pub capacity: usize,
    pub head_dim: usize,
}

/// Which keys a decoding step attends to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DecodeKeys {
    /// Every cached key up to the query's position.
    Full,
    /// The keys of the blocks a selection `[batch, heads_kv, n_q, nsel]` names (the selection
    /// contract of [`SelectOptions`]: block indices of `block` tokens, SENTINEL = none).
    Sparse { block: usize, nsel: usize },
}

impl DecodeShape {
    pub fn group(&self) -> usize {
        self.heads_q / self.heads_kv
    }
    pub fn q_dims(&self) -> [usize; 4] {
        [self.batch, self.heads_q, self.n_q, self.head_dim]
    }
    pub fn cache_dims(&self) -> [usize; 4] {
        [self.batch, self.heads_kv, self.capacity, self.head_dim]
    }
    pub fn lse_dims(&self) -> [usize; 3] {
        [self.batch, self.heads_q, self.n_q]
    }
    pub fn bias_dims(&self) -> [usize; 3] {
        [self.batch, self.heads_kv, self.capacity]
    }
    pub fn sel_dims(&self, nsel: usize) -> [usize; 4] {
        [self.batch, self.heads_kv, self.n_q, nsel]
    }

    /// The prefill problem whose last `n_q` query rows this step computes, for a sequence of
    /// `len` tokens (one sequence).
    pub fn prefill(&self, len: usize) -> AttnShape {
        AttnShape {
            batch: 1,
            heads_q: self.heads_q,
            heads_kv: self.heads_kv,
            seq_q: self.n_q,
            seq_k: len,
            head_dim: self.head_dim,
        }
    }

    pub fn validate(&self, keys: &DecodeKeys, scale: Option<f32>) -> Result<()> {
        let s = self;
        for (name, v) in [
            ("batch", s.batch),
            ("heads_q", s.heads_q),
            ("heads_kv", s.heads_kv),
            ("n_q", s.n_q),
            ("capacity", s.capacity),
            ("head_dim", s.head_dim),
        ] {
            if v == 0 {
                invalid!("{name} is 0: every dimension of a decoding step must be at least 1");
            }
        }
        if s.n_q > s.capacity {
            invalid!(
                "n_q = {} new tokens do not fit a cache of capacity {}",
                s.n_q,
                s.capacity
            );
        }
        // Everything else is the prefill problem's rule (GQA, head_dim, sizes, scale).
        let mut whole = s.prefill(s.capacity);
        whole.batch = s.batch;
        whole.validate(&AttnOptions {
            causal: true,
            scale,
        })?;
        if let DecodeKeys::Sparse { block, nsel } = *keys {
            check_block_size(block)?;
            if nsel == 0 {
                invalid!("a selection of 0 blocks per token attends to nothing");
            }
        }
        Ok(())
    }

    /// Sequence lengths as the host knows them: one per sequence, each at least `n_q` (the new
    /// tokens are in the cache) and at most the capacity.
    pub fn check_lens(&self, lens: &[u32]) -> Result<()> {
        if lens.len() != self.batch {
            invalid!(
                "{} sequence lengths given for a batch of {}",
                lens.len(),
                self.batch
            );
        }
        for (b, &l) in lens.iter().enumerate() {
            if (l as usize) < self.n_q || l as usize > self.capacity {
                invalid!(
                    "sequence {b} has length {l}; a step of {} new tokens over caches of capacity \
                     {} needs lengths from {} to {}",
                    self.n_q,
                    self.capacity,
                    self.n_q,
                    self.capacity
                );
            }
        }
        Ok(())
    }
}

/// The KV caches of a batch of sequences: k and v `[batch, heads_kv, capacity, head_dim]`
/// each (and NOSA's per-key bias `[batch, heads_kv, capacity]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CacheShape {
    pub batch: usize,
    pub heads_kv: usize,
    pub capacity: usize,
    pub head_dim: usize,
}

impl CacheShape {
    pub fn dims(&self) -> [usize; 4] {
        [self.batch, self.heads_kv, self.capacity, self.head_dim]
    }
    pub fn bias_dims(&self) -> [usize; 3] {
        [self.batch, self.heads_kv, self.capacity]
    }
    /// The decoding step of `n_q` new tokens with `heads_q` query heads over these caches.
    pub fn step(&self, heads_q: usize, n_q: usize) -> DecodeShape {
        DecodeShape {
            batch: self.batch,
            heads_q,
            heads_kv: self.heads_kv,
            n_q,
            capacity: self.capacity,
            head_dim: self.head_dim,
        }
    }
    pub fn validate(&self) -> Result<()> {
        // Its rules are those of a one-token step with one query head per kv head.
        self.step(self.heads_kv, 1)
            .validate(&DecodeKeys::Full, None)
    }
}
