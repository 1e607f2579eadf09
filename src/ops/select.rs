//! Block selection on the GPU (`shaders/block_select.wgsl`): mean-pooled block keys, block
//! scores (SSA softmax or MoBA dot product, summed over the query heads of a group), and top-k
//! with forced blocks. The reference is `reference::select`; the definitions are there.
//! The top-k has two kernels ([`TopK`]): a bitonic sort that runs anywhere and, where the device
//! has subgroup operations, k rounds of a subgroup arg-max (`shaders/block_topk_sg.wgsl`).
//! NOSA's selection (`SelectOptions::evict` > 0) adds a per-token eviction score, pooled like the
//! keys (`evict_pool`), that ranks the last `evict` blocks of each row in a second stage of the
//! same top-k kernels.

use crate::gpu::Encoder;
use std::sync::Arc;

use crate::error::{Error, Result, invalid};
use crate::gpu::{DType, Gpu, Pipeline, PipelineKey, Storage, Tensor};
use crate::ops::coop::ScoreTiles;
use crate::ops::launch::{
    self, Arg, Chunk, Window, check_args, input, output, plan_units, window_sized,
};
use crate::ops::tiles::{Kind, score_tiles};
use crate::problem::AttnShape;
use crate::problem::{Scoring, SelectOptions, pooled_len, pooling};

crate::gpu::uniform::uniform!(
    "select_common.wgsl",
    SelParams,
    /// Uniform block shared with `shaders/block_select.wgsl` (`SelParams`).
    pub(crate) struct Params {
        pub seq_q: u32,
        pub seq_k: u32,
        pub q_pos0: u32,
        pub causal: u32,
        pub group: u32,
        pub nb: u32,
        pub k: u32,
        pub n_init: u32,
        pub n_local: u32,
        pub mode: u32,
        pub scale: f32,
        pub grid_x: u32,
        pub q_off: u32,
        pub k_off: u32,
        pub kb_off: u32,
        pub s_off: u32,
        pub i_off: u32,
        pub units: u32,
        pub np: u32,
        pub pool_w: u32,
        pub pool_s: u32,
        pub evict: u32,
        pub e_off: u32,
        pub ep_off: u32,
        pub u0: u32,
        pub heads_kv: u32,
        pub n_new: u32,
        pub pool_new: u32,
        pub n_split: u32,
        pub split_np: u32,
        pub pt_off: u32,
        pub ring: u32,
        pub lg_off: u32,
    }
);

/// Block-score workgroups a launch should have at least (rows split over their pooled keys
/// otherwise): a decoding step scores one token per sequence, and one workgroup per
/// (sequence, kv head) walking 2,000 pooled keys left the H200 idle (docs/BENCHMARKS.md).
const SCORE_WORKGROUPS: usize = 512;

/// The same for decoding's row_logits on subgroups (a split as small as one key per group of 8
/// lanes). H200, batch 16 x 8 kv heads at 32k, 32 layers: 2.48 ms a step with 512, 2.18 with
/// 2048, 2.45 with 4096, 3.06 with 8192 (docs/BENCHMARKS.md).
const ROW_WORKGROUPS: usize = 2048;

/// Developer knob: `SPARSE_ATTN_SCORE_WGS=n` replaces [`SCORE_WORKGROUPS`] and
/// [`ROW_WORKGROUPS`].
pub const SCORE_WGS_ENV: &str = "SPARSE_ATTN_SCORE_WGS";

fn score_workgroups(default: usize) -> usize {
    match crate::ops::tiles::tuning(SCORE_WGS_ENV, None).as_deref() {
        Some(&[n]) if n > 0 => n as usize,
        _ => default,
    }
}

/// Decoding rows (new tokens x query heads per kv head) up to which the block scores run
/// row_logits / row_scores (a thread per pooled key against all rows) instead of the tiled
/// product, whose smallest tile (16 rows) and second pass over the keys made a batch-16 step
/// at 32k spend 21 of its 28 ms scoring on the H200 (docs/BENCHMARKS.md, 2026-12-01).
const ROWS_MAX: usize = 8;

/// Tensor classes of one launch, each split by (batch, kv-head) unit.
#[derive(Clone, Copy, Debug)]
enum Class {
    Q,
    K,
    KBar,
    Scores,
    Sel,
    /// NOSA: the per-token eviction score and its pooled windows.
    Evict,
    EPool,
    /// Split block scores: each row's max and sum per split.
    Part,
    /// Decoding rows' logits (row_logits).
    Logit,
}

/// The tensors a selection reads: q `[b, hq, sq, d]`, k `[b, hkv, sk, d]` and, for NOSA, the
/// per-token eviction score `[b, hkv, sk]` (f32; given exactly when `SelectOptions::evict` > 0).
#[derive(Clone, Copy, Debug)]
pub struct SelectInputs<'a> {
    pub q: &'a Tensor,
    pub k: &'a Tensor,
    pub evict: Option<&'a Tensor>,
}

impl<'a> SelectInputs<'a> {
    pub fn new(q: &'a Tensor, k: &'a Tensor) -> Self {
        Self { q, k, evict: None }
    }

    pub fn evict(self, evict: Option<&'a Tensor>) -> Self {
        Self { evict, ..self }
    }
}

/// Developer knob: `SPARSE_ATTN_TOPK=0|1` makes [`TopK::Auto`] the sort or the subgroup kernel.
pub const TOPK_ENV: &str = "SPARSE_ATTN_TOPK";

/// Which kernel picks the top k blocks of each row. Both give the same selection (same order,
/// same ties); they differ in speed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TopK {
    /// Subgroup where the device has subgroup operations and k is small against the blocks
    /// (see [`TopK::resolve`]), else the sort.
    Auto,
    /// Bitonic sort of every candidate in workgroup memory (`block_topk`).
    Sort,
    /// min(k, candidates) rounds of a workgroup arg-max built on subgroupMax / subgroupMin
    /// (`block_topk_sg`); needs SUBGROUP.
    Subgroup,
}

impl TopK {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(TopK::Auto),
            "sort" => Ok(TopK::Sort),
            "subgroup" => Ok(TopK::Subgroup),
            _ => invalid!("unknown top-k kernel `{s}` (known: auto, sort, subgroup)"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            TopK::Auto => "auto",
            TopK::Sort => "sort",
            TopK::Subgroup => "subgroup",
        }
    }

    /// Can this device run the subgroup kernel? The browser build keeps the sort: WGSL there
    /// needs `enable subgroups;`, which the native shader compiler (naga) does not accept yet.
    pub fn subgroup_supported(gpu: &Gpu) -> Result<()> {
        if cfg!(target_arch = "wasm32") {
            return Err(Error::Unsupported(
                "the subgroup top-k is native-only (browsers need `enable subgroups;`)".into(),
            ));
        }
        if !gpu.features().contains(wgpu::Features::SUBGROUP) {
            return Err(Error::Unsupported(
                "the subgroup top-k needs SUBGROUP, which this device does not offer".into(),
            ));
        }
        Ok(())
    }

    /// The kernel that runs for `k` of `blocks` on `gpu` (`nosa`: with NOSA's second ranking):
    /// Sort or Subgroup. Auto takes the subgroup rounds when k <= blocks / 32: on the H100 a
    /// round cost about what 1/30 of the sort did per block (docs/BENCHMARKS.md: at 16k tokens,
    /// B 16, k 16 it halves the top-k; at 4k, or k 64 at 16k, the sort is faster). NOSA sorts
    /// twice, so there k <= blocks / 8 (H200, decoding k 64 of 513 blocks: 1.31 against 1.51
    /// ms a step of 32 layers).
    pub fn resolve(self, gpu: &Gpu, k: usize, blocks: usize, nosa: bool) -> Result<TopK> {
        // Developer knob for measuring: SPARSE_ATTN_TOPK=0 (sort) or 1 (subgroup).
        let knob = match self {
            TopK::Auto => crate::ops::tiles::tuning(TOPK_ENV, None),
            _ => None,
        };
        if let Some(v) = knob {
            return match v[..] {
                [0] => Ok(TopK::Sort),
                [1] => Self::subgroup_supported(gpu).map(|()| TopK::Subgroup),
                _ => invalid!("{TOPK_ENV} takes 0 (sort) or 1 (subgroup)"),
            };
        }
        match self {
            TopK::Sort => Ok(TopK::Sort),
            TopK::Subgroup => Self::subgroup_supported(gpu).map(|()| TopK::Subgroup),
            TopK::Auto => Ok(
                if k * if nosa { 8 } else { 32 } <= blocks && Self::subgroup_supported(gpu).is_ok()
                {
                    TopK::Subgroup
                } else {
                    TopK::Sort
                },
            ),
        }
    }
}

/// Which kernel computes the block scores. Both compute the same scores (the tensor cores
/// from f16 operands: the pooled keys are rounded to f16 for the product).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScoreKernel {
    /// Tensor cores where the device, dtype and shape allow (see [`ScoreKernel::Coop`]) and a
    /// launch has enough tiles to fill the GPU without splitting rows, else the tiled kernel.
    Auto,
    /// f32 arithmetic on any device (`block_scores` in `shaders/block_select.wgsl`); splits
    /// rows over workgroups where there are few (`SelectConfig::score_split`).
    Tiled,
    /// Cooperative matrices (`shaders/block_scores_coop.wgsl`, `ops::coop`): native f16 q and
    /// k, a group of query heads that divides 128, no split rows, prefill (not decoding).
    Coop,
}

impl ScoreKernel {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(ScoreKernel::Auto),
            "tiled" => Ok(ScoreKernel::Tiled),
            "coop" => Ok(ScoreKernel::Coop),
            _ => invalid!("unknown block-score kernel `{s}` (known: auto, tiled, coop)"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ScoreKernel::Auto => "auto",
            ScoreKernel::Tiled => "tiled",
            ScoreKernel::Coop => "coop",
        }
    }
}

/// The tensors the pooling kernels read and write (`lens` while decoding).
#[derive(Clone, Copy)]
struct PoolIo<'a> {
    k: &'a Tensor,
    evict: Option<&'a Tensor>,
    lens: Option<&'a Tensor>,
    scratch: &'a SelectScratch,
}

/// The tensors the scoring and top-k kernels read and write (`lens` while decoding).
#[derive(Clone, Copy)]
struct ScoreIo<'a> {
    q: &'a Tensor,
    lens: Option<&'a Tensor>,
    scratch: &'a SelectScratch,
    out: &'a Tensor,
}

/// Intermediate tensors of a selection (kept so metrics and tests can look at the scores).
#[derive(Debug)]
pub struct SelectScratch {
    /// Mean-pooled keys `[b, hkv, np, d]` (np = blocks, or InfLLM-V2's kernels).
    pub block_keys: Tensor,
    /// `[b, hkv, seq_q, np]`: pooled-key scores of the candidates (-3e38 for the others).
    pub scores: Tensor,
    /// NOSA: the eviction score mean-pooled over each window `[b, hkv, np]`.
    pub evict_pooled: Option<Tensor>,
    /// Split block scores (see [`BlockSelect::score_split`]): each row's max and sum of
    /// exp2 over each split's pooled keys, `[b, hkv, seq_q·group, n_split, 2]` (f32).
    pub partials: Option<Tensor>,
    /// Decoding's few rows (see [`BlockSelect::logit_dims`]): each row's scaled logits
    /// `[b, hkv, seq_q·group, np]` (f32).
    pub logits: Option<Tensor>,
}

/// Block selection for one problem shape: validated once, pipelines fetched once.
#[derive(Debug)]
pub struct BlockSelect {
    shape: AttnShape,
    opts: SelectOptions,
    nb: usize,
    /// Pooled keys (= nb except for InfLLM-V2's overlapping kernels).
    np: usize,
    chunks: Vec<Chunk>,
    /// Threads per workgroup of every entry, and tokens per block-score workgroup.
    nt: u32,
    tokens_per_wg: u32,
    keys: Arc<Pipeline>,
    scores: Arc<Pipeline>,
    /// Pass 1 of split block scores (SSA, InfLLM-V2 with n_split > 1; every decoding row
    /// selection: row_logits).
    lse: Option<Arc<Pipeline>>,
    /// Rows per unit scored by row_logits / row_scores (decoding, at most ROWS_MAX), else 0.
    rows: usize,
    /// row_logits in its subgroup form (`rows_subgroups`).
    rows_sg: bool,
    /// Pooled-key splits per row of the block scores, and pooled keys per split.
    n_split: usize,
    split_np: usize,
    topk: Arc<Pipeline>,
    /// NOSA: pools the eviction score.
    evict_pool: Option<Arc<Pipeline>>,
    /// The top-k kernel running (Sort or Subgroup).
    topk_kernel: TopK,
    /// Rows per top-k workgroup: 1, or (`block_topk_row`) one per subgroup.
    topk_rows: u32,
    /// The block-score kernel running (Tiled or Coop).
    score_kernel: ScoreKernel,
    storage: Storage,
    decoding: bool,
    ring: Option<usize>,
}

/// What a [`BlockSelect`] is built for besides the shape.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SelectConfig {
    pub options: SelectOptions,
    /// q and k (F32 or F16; scores are computed in f32 either way).
    pub dtype: DType,
    /// The top-k kernel (an error where the device cannot run the one asked for).
    pub topk: TopK,
    /// The block-score kernel (an error where the device or shape cannot run the one asked
    /// for).
    pub scores: ScoreKernel,
    /// Decoding over KV caches (the shape's seq_k is their capacity, seq_q the new tokens):
    /// each sequence has its own length (a u32 tensor `[batch]`), and the pooled keys and
    /// eviction scores persist in the [`SelectScratch`] across steps, pooled as windows
    /// complete ([`BlockSelect::encode_pool`]) and selected from ([`BlockSelect::encode_pooled`]).
    pub decoding: bool,
    /// Pooled keys per block-score workgroup (rounded up to its key tile, see
    /// [`BlockSelect::score_split`]); `None`: split a row's keys over workgroups only when
    /// there are too few rows to fill the GPU (decoding: nearly always).
    pub score_split: Option<usize>,
    /// Decoding: k and the eviction score given to [`BlockSelect::encode_pool`] hold only the
    /// most recent `ring` tokens of each sequence, token t in row t % ring (the staged
    /// offloaded cache keeps them so on the GPU); `None`: every token, in row t.
    pub ring: Option<usize>,
}

impl SelectConfig {
    pub fn new(options: SelectOptions) -> Self {
        Self {
            options,
            dtype: DType::F32,
            topk: TopK::Auto,
            scores: ScoreKernel::Auto,
            decoding: false,
            score_split: None,
            ring: None,
        }
    }

    pub fn ring(self, ring: Option<usize>) -> Self {
        Self { ring, ..self }
    }

    pub fn score_split(self, score_split: Option<usize>) -> Self {
        Self {
            score_split,
            ..self
        }
    }

    pub fn decoding(self, decoding: bool) -> Self {
        Self { decoding, ..self }
    }

    pub fn dtype(self, dtype: DType) -> Self {
        Self { dtype, ..self }
    }

    pub fn topk(self, topk: TopK) -> Self {
        Self { topk, ..self }
    }

    pub fn scores(self, scores: ScoreKernel) -> Self {
        Self { scores, ..self }
    }
}

/// Developer knob: `SPARSE_ATTN_ROWS_SG=0` keeps decoding's row logits at a thread per pooled
/// key where the subgroup version could run.
pub const ROWS_SG_ENV: &str = "SPARSE_ATTN_ROWS_SG";

/// Can row_logits split each pooled key's row over 8 lanes of a subgroup (its `SG` form)? It
/// needs subgroup shuffles (native only: browsers need `enable subgroups;`), subgroups of at
/// least 8 lanes that tile the workgroup of `nt`, and head_dim a multiple of 32.
fn rows_subgroups(gpu: &Gpu, nt: u32, head_dim: usize) -> bool {
    let (lo, hi) = gpu.adapter_subgroup_sizes();
    let knob = crate::ops::tiles::tuning(ROWS_SG_ENV, None);
    !cfg!(target_arch = "wasm32")
        && gpu.features().contains(wgpu::Features::SUBGROUP)
        && lo >= 8
        && hi > 0
        && nt.is_multiple_of(hi)
        && head_dim.is_multiple_of(32)
        && knob.is_none_or(|v| v != [0])
}

/// Developer knob: `SPARSE_ATTN_TOPK_ROWS=0` keeps the subgroup top-k at a workgroup per row
/// where a subgroup per row could run.
pub const TOPK_ROWS_ENV: &str = "SPARSE_ATTN_TOPK_ROWS";

/// Lanes per row of the subgroup top-k's one-subgroup-per-row form (`block_topk_row`), or
/// `None` where it cannot run: it needs one subgroup size on the adapter that tiles the
/// workgroup of `nt`, k winners at most one per lane, and at most 64 blocks per lane (`nbp`
/// blocks rounded up to a power of two).
fn row_topk_lanes(gpu: &Gpu, nt: u32, k: usize, nbp: u32) -> Option<u32> {
    let (lo, hi) = gpu.adapter_subgroup_sizes();
    let knob = crate::ops::tiles::tuning(TOPK_ROWS_ENV, None);
    (lo == hi
        && lo >= 4
        && nt.is_multiple_of(lo)
        && k <= lo as usize
        && nbp.div_ceil(lo) <= 64
        && knob.is_none_or(|v| v != [0]))
    .then_some(lo)
}

impl BlockSelect {
    pub fn new(gpu: &Gpu, shape: AttnShape, config: &SelectConfig) -> Result<Self> {
        let SelectConfig {
            options: opts,
            dtype,
            topk,
            scores: score_kernel,
            decoding,
            score_split,
            ring,
        } = *config;
        if decoding && !opts.causal {
            invalid!("selection while decoding is causal; these options are not");
        }
        if let Some(r) = ring {
            let (w, _) = pooling(&opts);
            if !decoding || r <= w || r > shape.seq_k {
                invalid!(
                    "a ring of {r} recent keys: rings are for decoding and hold more than a \
                     pooling window ({w}) and at most the capacity ({})",
                    shape.seq_k
                );
            }
        }
        let storage = Storage::for_dtype(gpu, dtype)?;
        opts.validate(&shape)?;
        let nb = opts.blocks(shape.seq_k);
        let topk_kernel = topk.resolve(gpu, opts.k, nb, opts.evict > 0)?;
        let np = pooled_len(&opts, shape.seq_k);
        let nbp = nb.next_power_of_two().max(2) as u32;
        let l = gpu.limits();
        if nbp * 8 > l.max_compute_workgroup_storage_size {
            return Err(Error::Unsupported(format!(
                "{nb} blocks per row need {} bytes of workgroup memory for the top-k sort; this \
                 device allows {} (use a larger block size or a shorter sequence)",
                nbp * 8,
                l.max_compute_workgroup_storage_size
            )));
        }
        let g = shape.group() as u32;
        let d32 = shape.head_dim as u32;
        // Decoding scores a few tokens: the smallest tile that holds their rows wastes least.
        let rows = decoding.then_some(g * shape.seq_q as u32);
        let tiles = score_tiles(g, d32, l.max_compute_workgroup_storage_size - 16, rows)
            .ok_or_else(|| {
            Error::Unsupported(format!(
                "block scores for {g} query heads per kv head and head_dim {d32} need more than \
                 the {} bytes of workgroup memory this device has",
                l.max_compute_workgroup_storage_size
            ))
        })?;
        let nt = tiles.threads(d32);
        if l.max_compute_invocations_per_workgroup < nt || l.max_compute_workgroup_size_x < nt {
            return Err(Error::Unsupported(format!(
                "block selection uses {nt} invocations per workgroup; this device allows {}",
                l.max_compute_invocations_per_workgroup
            )));
        }
        let topk_rows = match topk_kernel {
            TopK::Subgroup => row_topk_lanes(gpu, nt, opts.k, nbp),
            _ => None,
        };
        // Decoding's few rows: a thread per pooled key (where its workgroup memory fits).
        let rows = match decoding && shape.seq_q * shape.group() <= ROWS_MAX {
            true => shape.seq_q * shape.group(),
            false => 0,
        };
        let rows_shared = (rows * shape.head_dim * 4 + rows * nt as usize * 4 + rows * 4) as u32;
        let rows = match rows_shared <= l.max_compute_workgroup_storage_size {
            true => rows,
            false => 0,
        };
        let rows_sg = rows > 0 && rows_subgroups(gpu, nt, shape.head_dim);
        // The block scores on tensor cores, where asked for or (Auto) where they run unsplit
        // with enough tiles to fill the GPU.
        let coop_ok = || -> Result<ScoreTiles> {
            if storage != Storage::F16 {
                return Err(Error::Unsupported(format!(
                    "the tensor-core block scores take native f16 q and k, not {}",
                    storage.name()
                )));
            }
            if decoding {
                // Its lengths per sequence (VARLEN) are not covered by its tests yet.
                return Err(Error::Unsupported(
                    "decoding's selection keeps the tiled block scores (the tensor-core kernel \
                     is for prefill)"
                        .into(),
                ));
            }
            if score_split.is_some_and(|n| n < pooled_len(&opts, shape.seq_k)) {
                return Err(Error::Unsupported(
                    "the tensor-core block scores do not split rows (score_split)".into(),
                ));
            }
            crate::ops::coop::scores_supported(gpu, shape.head_dim, g as usize)
        };
        let coop = match score_kernel {
            ScoreKernel::Tiled => None,
            ScoreKernel::Coop => Some(coop_ok()?),
            ScoreKernel::Auto => coop_ok().ok().filter(|t| {
                let tiles = shape.seq_q.div_ceil((t.rows() / g) as usize);
                tiles * shape.batch * shape.heads_kv >= score_workgroups(SCORE_WORKGROUPS)
            }),
        };
        let tokens_per_wg = match (coop, rows) {
            (Some(t), _) => t.rows() / g,
            (None, 0) => tiles.rows() / g,
            _ => shape.seq_q as u32,
        };
        let (d, sq, sk) = (
            shape.head_dim as u64,
            shape.seq_q as u64,
            shape.seq_k as u64,
        );
        let g = shape.group() as u64;
        let max_x = l.max_compute_workgroups_per_dimension as usize;
        let tiles_x = (shape.seq_q).div_ceil(tokens_per_wg as usize);
        if tiles_x > max_x {
            return Err(Error::Unsupported(format!(
                "{sq} query tokens exceed this device's dispatch limit"
            )));
        }
        // Split each row's pooled keys over workgroups when the rows alone launch too few.
        let bk = tiles.cols as usize;
        // (The row kernels take any split; a thread per key wants about NT keys or more.)
        let unit = if rows > 0 { 1 } else { bk };
        let split_np = match score_split {
            Some(0) => invalid!("score_split = 0: a block-score workgroup scores at least one key"),
            Some(n) => n.min(np).next_multiple_of(unit),
            None if rows > 0 => {
                let wgs = if rows_sg {
                    ROW_WORKGROUPS
                } else {
                    SCORE_WORKGROUPS
                };
                let want = score_workgroups(wgs).div_ceil(shape.batch * shape.heads_kv);
                // A split of at least one key per thread (per group of 8 lanes on subgroups).
                np.div_ceil(want)
                    .max(nt as usize / if rows_sg { 8 } else { 1 })
            }
            None => {
                let wgs = tiles_x * shape.batch * shape.heads_kv;
                let want = score_workgroups(SCORE_WORKGROUPS)
                    .div_ceil(wgs)
                    .min(np.div_ceil(bk))
                    .max(1);
                np.div_ceil(want).next_multiple_of(bk)
            }
        };
        let n_split = match coop {
            Some(_) => 1,
            None => np.div_ceil(split_np).clamp(1, max_x / tiles_x),
        };
        let split_np = np.div_ceil(n_split).next_multiple_of(unit);
        let two_pass = rows > 0 || (n_split > 1 && opts.scoring != Scoring::Moba);
        let e = dtype.size() as u64;
        let mut per_unit = vec![
            ("query tensor", g * sq * d * e),
            ("key tensor", sk * d * e),
            ("pooled-key scratch", np as u64 * d * 4),
            ("pooled-score scratch", sq * np as u64 * 4),
            ("selection", sq * opts.k as u64 * 4),
            ("eviction score", sk * 4),
            ("split scores", sq * g * n_split as u64 * 8),
        ];
        if rows > 0 {
            per_unit.push(("row logits", sq * g * np as u64 * 4));
        }
        let chunks = plan_units(
            gpu,
            (shape.batch * shape.heads_kv) as u64,
            &per_unit,
            l.max_compute_workgroups_per_dimension as u64,
        )?;
        let key = |entry| PipelineKey {
            file: if entry == "block_topk_sg" || entry == "block_topk_row" {
                "block_topk_sg.wgsl"
            } else {
                "block_select.wgsl"
            },
            entry,
            constants: [
                ("BLK", opts.block as u32),
                ("NBP", nbp),
                ("NOSA", (opts.evict > 0) as u32),
                ("VARLEN", decoding as u32),
                // Split rows whose scores need a log-sum-exp (block_lse's statistics), and
                // decoding's row kernels (which keep statistics per split too).
                ("SPLIT", two_pass as u32),
                ("ROWS", rows as u32),
                ("SG", rows_sg as u32),
            ]
            .into_iter()
            .chain(tiles.constants(Kind::Fwd, d32))
            .collect(),
            checked: false,
            storage,
        };
        Ok(Self {
            shape,
            opts,
            nb,
            np,
            chunks,
            nt,
            tokens_per_wg,
            keys: gpu.pipeline(&key("block_keys"))?,
            scores: match coop {
                Some(t) => gpu.pipeline(&crate::ops::coop::scores_key(
                    shape.head_dim as u32,
                    t,
                    opts.block as u32,
                    opts.evict > 0,
                    g as u32,
                ))?,
                None => gpu.pipeline(&key(match rows {
                    0 => "block_scores",
                    _ => "row_scores",
                }))?,
            },
            score_kernel: match coop {
                Some(_) => ScoreKernel::Coop,
                None => ScoreKernel::Tiled,
            },
            lse: match (rows, two_pass) {
                (0, false) => None,
                (0, true) => Some(gpu.pipeline(&key("block_lse"))?),
                _ => Some(gpu.pipeline(&key("row_logits"))?),
            },
            rows,
            rows_sg,
            n_split,
            split_np,
            topk: gpu.pipeline(&match (topk_kernel, topk_rows) {
                (TopK::Subgroup, lanes) => {
                    let mut k = key(match lanes {
                        Some(_) => "block_topk_row",
                        None => "block_topk_sg",
                    });
                    // The slots a row's blocks are dealt to: lanes, or the workgroup's threads;
                    // and each slot's share, which the shader unrolls.
                    let slots = lanes.unwrap_or(nt);
                    k.constants.push(("SLOTS", slots));
                    k.constants.push(("EPT", nbp.div_ceil(slots)));
                    k
                }
                _ => key("block_topk"),
            })?,
            topk_rows: topk_rows.map_or(1, |sgs| nt / sgs),
            evict_pool: match opts.evict > 0 {
                true => Some(gpu.pipeline(&key("evict_pool"))?),
                false => None,
            },
            topk_kernel,
            storage,
            decoding,
            ring,
        })
    }

    pub fn shape(&self) -> &AttnShape {
        &self.shape
    }

    /// The top-k kernel this selection runs (Sort or Subgroup).
    /// Does decoding's row_logits split each pooled key over subgroup lanes (see
    /// `rows_subgroups`)? False where the row kernels do not run.
    pub fn row_subgroups(&self) -> bool {
        self.rows_sg
    }

    pub fn topk_kernel(&self) -> TopK {
        self.topk_kernel
    }

    /// Rows per top-k workgroup: 1, or more where the subgroup top-k takes a subgroup per row
    /// (`block_topk_row`; see `row_topk_lanes`).
    pub fn topk_rows(&self) -> u32 {
        self.topk_rows
    }

    /// The block-score kernel this selection runs (Tiled or Coop).
    pub fn score_kernel(&self) -> ScoreKernel {
        self.score_kernel
    }

    /// Blocks of the key sequence.
    pub fn blocks(&self) -> usize {
        self.nb
    }

    /// Pooled keys the scores refer to (the blocks, or InfLLM-V2's overlapping kernels).
    pub fn pooled(&self) -> usize {
        self.np
    }

    /// Rows of k (and the eviction score) per (sequence, kv head) the pooling reads.
    fn key_rows(&self) -> usize {
        self.ring.unwrap_or(self.shape.seq_k)
    }

    /// Pooled-key splits per row of the block scores (1: one workgroup scores a whole row
    /// tile), and pooled keys per split.
    pub fn score_split(&self) -> (usize, usize) {
        (self.n_split, self.split_np)
    }

    /// Shape of [`SelectScratch::partials`] when this selection splits rows whose scores
    /// need a log-sum-exp (SSA, InfLLM-V2), else `None`.
    pub fn split_dims(&self) -> Option<[usize; 5]> {
        let s = &self.shape;
        self.lse
            .as_ref()
            .map(|_| [s.batch, s.heads_kv, s.seq_q * s.group(), self.n_split, 2])
    }

    /// Shape of [`SelectScratch::logits`] when the block scores run decoding's row kernels,
    /// else `None`.
    pub fn logit_dims(&self) -> Option<[usize; 4]> {
        let s = &self.shape;
        (self.rows > 0).then_some([s.batch, s.heads_kv, self.rows, self.np])
    }

    /// Launches per kernel (more than one when tensors exceed the binding limit).
    pub fn chunks(&self) -> usize {
        self.chunks.len()
    }

    /// Shape of the selection tensor: `[b, hkv, seq_q, k]`.
    pub fn selection_dims(&self) -> [usize; 4] {
        let s = &self.shape;
        [s.batch, s.heads_kv, s.seq_q, self.opts.k]
    }

    pub fn scratch(&self, gpu: &Gpu) -> Result<SelectScratch> {
        let s = &self.shape;
        Ok(SelectScratch {
            block_keys: gpu.empty(&[s.batch, s.heads_kv, self.np, s.head_dim], DType::F32)?,
            scores: gpu.empty(&[s.batch, s.heads_kv, s.seq_q, self.np], DType::F32)?,
            evict_pooled: match self.opts.evict > 0 {
                true => Some(gpu.empty(&[s.batch, s.heads_kv, self.np], DType::F32)?),
                false => None,
            },
            partials: match self.split_dims() {
                Some(d) => Some(gpu.empty(&d, DType::F32)?),
                None => None,
            },
            logits: match self.logit_dims() {
                Some(d) => Some(gpu.empty(&d, DType::F32)?),
                None => None,
            },
        })
    }

    fn window_of(&self, gpu: &Gpu, class: Class, c: Chunk) -> Window {
        let s = &self.shape;
        let (d, sq, np) = (s.head_dim as u64, s.seq_q as u64, self.np as u64);
        let e = self.storage.dtype().size() as u64;
        let (per_unit, elem) = match class {
            Class::Q => (s.group() as u64 * sq * d, e),
            Class::K => (self.key_rows() as u64 * d, e),
            Class::KBar => (np * d, 4),
            Class::Scores => (sq * np, 4),
            Class::Sel => (sq * self.opts.k as u64, 4),
            Class::Evict => (self.key_rows() as u64, 4),
            Class::EPool => (np, 4),
            Class::Part => (sq * s.group() as u64 * self.n_split as u64 * 2, 4),
            Class::Logit => (sq * s.group() as u64 * np, 4),
        };
        let align = gpu.limits().min_storage_buffer_offset_alignment as u64;
        window_sized(c.u0 * per_unit, (c.u1 - c.u0) * per_unit, align, elem)
    }

    /// The launch parameters of chunk `c` (`grid_x` set per dispatch).
    fn params(&self, gpu: &Gpu, c: Chunk) -> Params {
        let s = self.shape;
        let w = |class| self.window_of(gpu, class, c);
        let nosa = self.opts.evict > 0;
        Params {
            seq_q: s.seq_q as u32,
            seq_k: s.seq_k as u32,
            q_pos0: s.q_offset() as u32,
            causal: self.opts.causal as u32,
            group: s.group() as u32,
            nb: self.nb as u32,
            k: self.opts.k as u32,
            n_init: self.opts.n_init as u32,
            n_local: self.opts.n_local as u32,
            mode: match self.opts.scoring {
                Scoring::Ssa => 0,
                Scoring::Moba => 1,
                Scoring::InfLlmV2 => 2,
            },
            scale: self.opts.scale.unwrap_or(1.0 / (s.head_dim as f32).sqrt()),
            grid_x: 0,
            q_off: w(Class::Q).skip,
            k_off: w(Class::K).skip,
            kb_off: w(Class::KBar).skip,
            s_off: w(Class::Scores).skip,
            i_off: w(Class::Sel).skip,
            units: (c.u1 - c.u0) as u32,
            np: self.np as u32,
            pool_w: pooling(&self.opts).0 as u32,
            pool_s: pooling(&self.opts).1 as u32,
            evict: self.opts.evict as u32,
            e_off: if nosa { w(Class::Evict).skip } else { 0 },
            ep_off: if nosa { w(Class::EPool).skip } else { 0 },
            u0: c.u0 as u32,
            heads_kv: s.heads_kv as u32,
            n_new: 0,
            pool_new: 0,
            n_split: self.n_split as u32,
            split_np: self.split_np as u32,
            pt_off: if self.lse.is_some() {
                w(Class::Part).skip
            } else {
                0
            },
            ring: self.ring.unwrap_or(0) as u32,
            lg_off: if self.rows > 0 {
                w(Class::Logit).skip
            } else {
                0
            },
        }
    }

    /// A 2-D grid of workgroups for `n` threads of `self.nt`.
    fn grid(&self, gpu: &Gpu, n: u64) -> (u32, u32) {
        let max_x = gpu.limits().max_compute_workgroups_per_dimension as u64;
        let blocks = n.div_ceil(self.nt as u64).max(1);
        let gx = blocks.min(max_x);
        (gx as u32, blocks.div_ceil(gx) as u32)
    }

    /// Checks the eviction score and its pooled scratch against the options; their arguments.
    fn evict_args<'a>(
        &self,
        evict: Option<&'a Tensor>,
        scratch: &'a SelectScratch,
        dims: &'a [[usize; 3]; 2],
    ) -> Result<Vec<Arg<'a>>> {
        let nosa = self.opts.evict > 0;
        match (evict, &scratch.evict_pooled, nosa) {
            (Some(e), Some(ep), true) => Ok(vec![
                input("eviction score", e, &dims[0], DType::F32),
                output("pooled eviction score", ep, &dims[1], DType::F32),
            ]),
            (None, _, false) => Ok(vec![]),
            (None, _, true) => invalid!(
                "this selection keeps {} blocks by an eviction score; none was given",
                self.opts.evict
            ),
            (Some(_), _, false) => {
                invalid!("an eviction score was given to a selection with evict = 0")
            }
            (_, None, true) => invalid!(
                "the scratch has no pooled eviction score (make it with BlockSelect::scratch)"
            ),
        }
    }

    /// The split statistics' scratch, checked against this selection's split.
    fn part_arg<'a>(
        &self,
        scratch: &'a SelectScratch,
        dims: &'a [usize; 5],
        logit_dims: &'a [usize; 4],
    ) -> Result<Vec<Arg<'a>>> {
        let mut args = match (&self.lse, &scratch.partials) {
            (None, _) => vec![],
            (Some(_), Some(t)) => vec![output("split scores", t, dims, DType::F32)],
            (Some(_), None) => invalid!(
                "the scratch has no split scores (make it with this selection's \
                 BlockSelect::scratch)"
            ),
        };
        match (self.rows > 0, &scratch.logits) {
            (false, _) => {}
            (true, Some(t)) => args.push(output("row logits", t, logit_dims, DType::F32)),
            (true, None) => invalid!(
                "the scratch has no row logits (make it with this selection's \
                 BlockSelect::scratch)"
            ),
        }
        Ok(args)
    }

    fn check_mode(&self, decoding: bool) -> Result<()> {
        match (self.decoding, decoding) {
            (true, false) => invalid!(
                "this selection was built for decoding (SelectConfig::decoding): use \
                 encode_pool and encode_pooled"
            ),
            (false, true) => invalid!(
                "this selection was built for prefill: build it with SelectConfig::decoding to \
                 select from pooled caches"
            ),
            _ => Ok(()),
        }
    }

    /// Pooling: the keys' windows (and NOSA's eviction score pooled alike) into the scratch.
    fn dispatch_pool(&self, gpu: &Gpu, enc: &mut Encoder, io: PoolIo, c: Chunk, base: Params) {
        let PoolIo {
            k,
            evict,
            lens,
            scratch,
        } = io;
        let w = |class| self.window_of(gpu, class, c);
        let windows = match self.decoding {
            true => base.pool_new as u64,
            false => self.np as u64,
        };
        let lens_view: Vec<(u32, &Tensor, Window)> = lens
            .map(|t| (8, t, window_sized(0, self.shape.batch as u64, 256, 4)))
            .into_iter()
            .collect();
        let units = base.units as u64;
        let g = self.grid(gpu, units * windows * self.shape.head_dim as u64 / 4);
        let p = Params {
            grid_x: g.0,
            ..base
        };
        let kbar = (3, &scratch.block_keys, w(Class::KBar));
        launch::dispatch(
            gpu,
            enc,
            &self.keys,
            bytemuck::bytes_of(&p),
            &[&[(2, k, w(Class::K)), kbar][..], &lens_view].concat(),
            g,
        );
        if let (Some(pipe), Some(e), Some(ep)) = (&self.evict_pool, evict, &scratch.evict_pooled) {
            let g = self.grid(gpu, units * windows);
            let p = Params {
                grid_x: g.0,
                ..base
            };
            launch::dispatch(
                gpu,
                enc,
                pipe,
                bytemuck::bytes_of(&p),
                &[
                    &[(6, e, w(Class::Evict)), (7, ep, w(Class::EPool))][..],
                    &lens_view,
                ]
                .concat(),
                g,
            );
        }
    }

    /// Scoring and top-k from the pooled keys (and eviction scores) in the scratch.
    fn dispatch_select(&self, gpu: &Gpu, enc: &mut Encoder, io: ScoreIo, c: Chunk, base: Params) {
        let ScoreIo {
            q,
            lens,
            scratch,
            out,
        } = io;
        let s = self.shape;
        let w = |class| self.window_of(gpu, class, c);
        let lens_view: Vec<(u32, &Tensor, Window)> = lens
            .map(|t| (8, t, window_sized(0, s.batch as u64, 256, 4)))
            .into_iter()
            .collect();
        let kbar = (3, &scratch.block_keys, w(Class::KBar));
        let scores = (4, &scratch.scores, w(Class::Scores));
        let units = base.units;
        let grid = (
            (s.seq_q as u32).div_ceil(self.tokens_per_wg) * self.n_split as u32,
            units,
        );
        // Split rows: pass 1 per split first (the scratch was checked against the pipeline).
        let part: Vec<(u32, &Tensor, Window)> = match (&self.lse, &scratch.partials) {
            (Some(lse), Some(t)) => {
                let mut part = vec![(9, t, w(Class::Part))];
                if let Some(lg) = scratch.logits.as_ref().filter(|_| self.rows > 0) {
                    part.push((10, lg, w(Class::Logit)));
                }
                launch::dispatch(
                    gpu,
                    enc,
                    lse,
                    bytemuck::bytes_of(&base),
                    &[&[(1, q, w(Class::Q)), kbar][..], &part, &lens_view].concat(),
                    grid,
                );
                part
            }
            _ => vec![],
        };
        // row_scores reads the logits row_logits kept, not q or the keys (the layout of an
        // entry holds only the bindings it uses).
        let inputs: &[(u32, &Tensor, Window)] = match self.rows {
            0 => &[(1, q, w(Class::Q)), kbar, scores],
            _ => &[scores],
        };
        launch::dispatch(
            gpu,
            enc,
            &self.scores,
            bytemuck::bytes_of(&base),
            &[inputs, &part, &lens_view].concat(),
            grid,
        );
        let epool: Vec<(u32, &Tensor, Window)> = match (&self.evict_pool, &scratch.evict_pooled) {
            (Some(_), Some(ep)) => vec![(7, ep, w(Class::EPool))],
            _ => vec![],
        };
        // A workgroup per row (or per topk_rows rows): the 2-D grid counts workgroups.
        let max_x = gpu.limits().max_compute_workgroups_per_dimension as u64;
        let wgs = (units as u64 * s.seq_q as u64).div_ceil(self.topk_rows as u64);
        let gx = wgs.min(max_x);
        let p = Params {
            grid_x: gx as u32,
            ..base
        };
        launch::dispatch(
            gpu,
            enc,
            &self.topk,
            bytemuck::bytes_of(&p),
            &[&[scores, (5, out, w(Class::Sel))][..], &epool, &lens_view].concat(),
            (gx as u32, wgs.div_ceil(gx) as u32),
        );
    }

    /// Record the selection: `out` (u32, [`Self::selection_dims`]) receives the block indices.
    pub fn encode(
        &self,
        gpu: &Gpu,
        enc: &mut Encoder,
        x: &SelectInputs,
        scratch: &SelectScratch,
        out: &Tensor,
    ) -> Result<()> {
        self.check_mode(false)?;
        let SelectInputs { q, k, evict } = *x;
        let s = self.shape;
        let dt = self.storage.dtype();
        let (qd, kd, sd) = (s.q_dims(), s.kv_dims(), self.selection_dims());
        let kbd = [s.batch, s.heads_kv, self.np, s.head_dim];
        let scd = [s.batch, s.heads_kv, s.seq_q, self.np];
        let ed = [
            [s.batch, s.heads_kv, s.seq_k],
            [s.batch, s.heads_kv, self.np],
        ];
        let mut args = vec![
            input("q", q, &qd, dt),
            input("k", k, &kd, dt),
            output("block_keys", &scratch.block_keys, &kbd, DType::F32),
            output("scores", &scratch.scores, &scd, DType::F32),
            output("selection", out, &sd, DType::U32),
        ];
        args.extend(self.evict_args(evict, scratch, &ed)?);
        let pd = self.split_dims().unwrap_or_default();
        let ld = self.logit_dims().unwrap_or_default();
        args.extend(self.part_arg(scratch, &pd, &ld)?);
        check_args(&args)?;
        for &c in &self.chunks {
            let base = self.params(gpu, c);
            let pool = PoolIo {
                k,
                evict,
                lens: None,
                scratch,
            };
            self.dispatch_pool(gpu, enc, pool, c, base);
            let score = ScoreIo {
                q,
                lens: None,
                scratch,
                out,
            };
            self.dispatch_select(gpu, enc, score, c, base);
        }
        Ok(())
    }

    /// Decoding: pool the windows that the newest `n_new` tokens of each cache completed (the
    /// caches `k` `[b, hkv, capacity, d]` and, for NOSA, the eviction score `[b, hkv,
    /// capacity]`, each sequence holding `lens[b]` tokens, those tokens included) into the
    /// scratch, which keeps every window pooled so far. Run once per appended chunk of tokens.
    #[allow(clippy::too_many_arguments)]
    pub fn encode_pool(
        &self,
        gpu: &Gpu,
        enc: &mut Encoder,
        k: &Tensor,
        evict: Option<&Tensor>,
        lens: &Tensor,
        n_new: usize,
        scratch: &SelectScratch,
    ) -> Result<()> {
        self.check_mode(true)?;
        let s = self.shape;
        let kd = [s.batch, s.heads_kv, self.key_rows(), s.head_dim];
        let kbd = [s.batch, s.heads_kv, self.np, s.head_dim];
        let ed = [
            [s.batch, s.heads_kv, self.key_rows()],
            [s.batch, s.heads_kv, self.np],
        ];
        let ld = [s.batch];
        let mut args = vec![
            input("k", k, &kd, self.storage.dtype()),
            input("lens", lens, &ld, DType::U32),
            output("block_keys", &scratch.block_keys, &kbd, DType::F32),
        ];
        args.extend(self.evict_args(evict, scratch, &ed)?);
        check_args(&args)?;
        if n_new == 0 || n_new > s.seq_k {
            invalid!("{n_new} new tokens to pool in caches of {} tokens", s.seq_k);
        }
        if let Some(r) = self.ring {
            // The windows they complete reach back a window before them: all in the ring.
            let w = pooling(&self.opts).0;
            if n_new + w > r {
                invalid!(
                    "{n_new} new tokens to pool from a ring of {r} recent keys: at most {} at a \
                     time (the ring also holds the pooling window before them)",
                    r - w
                );
            }
        }
        let stride = pooling(&self.opts).1;
        for &c in &self.chunks {
            let base = Params {
                n_new: n_new as u32,
                pool_new: n_new.div_ceil(stride) as u32 + 1,
                ..self.params(gpu, c)
            };
            let io = PoolIo {
                k,
                evict,
                lens: Some(lens),
                scratch,
            };
            self.dispatch_pool(gpu, enc, io, c, base);
        }
        Ok(())
    }

    /// Decoding: select blocks for the newest seq_q tokens of each sequence (q `[b, hq, seq_q,
    /// d]`, lengths `lens` `[b]` u32) from the windows [`Self::encode_pool`] pooled.
    pub fn encode_pooled(
        &self,
        gpu: &Gpu,
        enc: &mut Encoder,
        q: &Tensor,
        lens: &Tensor,
        scratch: &SelectScratch,
        out: &Tensor,
    ) -> Result<()> {
        self.check_mode(true)?;
        let s = self.shape;
        let (qd, sd) = (s.q_dims(), self.selection_dims());
        let kbd = [s.batch, s.heads_kv, self.np, s.head_dim];
        let scd = [s.batch, s.heads_kv, s.seq_q, self.np];
        let epd = [s.batch, s.heads_kv, self.np];
        let ld = [s.batch];
        let mut args = vec![
            input("q", q, &qd, self.storage.dtype()),
            input("lens", lens, &ld, DType::U32),
            input("block_keys", &scratch.block_keys, &kbd, DType::F32),
            output("scores", &scratch.scores, &scd, DType::F32),
            output("selection", out, &sd, DType::U32),
        ];
        match (&scratch.evict_pooled, self.opts.evict > 0) {
            (Some(ep), true) => args.push(input("pooled eviction score", ep, &epd, DType::F32)),
            (None, true) => invalid!(
                "the scratch has no pooled eviction score (make it with BlockSelect::scratch)"
            ),
            _ => {}
        }
        let pd = self.split_dims().unwrap_or_default();
        let ld = self.logit_dims().unwrap_or_default();
        args.extend(self.part_arg(scratch, &pd, &ld)?);
        check_args(&args)?;
        for &c in &self.chunks {
            let base = self.params(gpu, c);
            let io = ScoreIo {
                q,
                lens: Some(lens),
                scratch,
                out,
            };
            self.dispatch_select(gpu, enc, io, c, base);
        }
        Ok(())
    }

    /// Select blocks for q, k; returns the selection and the scratch (block keys, scores).
    pub fn select(&self, gpu: &Gpu, q: &Tensor, k: &Tensor) -> Result<(Tensor, SelectScratch)> {
        self.select_inputs(gpu, &SelectInputs::new(q, k))
    }

    /// [`Self::select`] with every input (NOSA's eviction score).
    pub fn select_inputs(&self, gpu: &Gpu, x: &SelectInputs) -> Result<(Tensor, SelectScratch)> {
        let scratch = self.scratch(gpu)?;
        let out = gpu.empty(&self.selection_dims(), DType::U32)?;
        let mut enc = gpu.encoder();
        self.encode(gpu, &mut enc, x, &scratch, &out)?;
        gpu.scoped("block selection", || gpu.queue.submit([enc.finish()]))?;
        Ok((out, scratch))
    }
}
