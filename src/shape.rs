//! Plain data types for attention problems and their validation.

use crate::error::{Result, invalid};

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
