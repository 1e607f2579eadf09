//! Cooperative-matrix (tensor-core) attention kernels: `shaders/attention_coop.wgsl`.
//!
//! Owns what the device must offer, the tile constants and the pipeline; `FullAttention` uses it
//! for `Variant::Coop`. The kernel stages f16 tiles in workgroup memory and multiplies 16x16x16
//! f16 matrices into f32 accumulators, one 16-row slice of the query tile per subgroup.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::gpu::{Gpu, Pipeline, PipelineKey, Storage};
use crate::ops::tiles::pair_knob;

/// Lanes per subgroup the kernel's softmax lane mapping assumes (two lanes per row of 16).
const SUBGROUP: u32 = 32;

/// Padding of the f32 scratch rows of the kernels that include coop_tile.wgsl (its SPAD; the
/// lane mapping in coop_lanes.wgsl follows it): 4 words, 8 for the dense forward (its
/// accumulator stores and softmax reads spread over the banks: 13.31 -> 13.06 ms against 4 at
/// 8192, d 128 on the H200). The backwards keep 4: 8 moved them by about 1%, and the H200 run of
/// their tests with 8 ended without a result (not investigated).
const SCRATCH_PAD: u32 = 4;
const FORWARD_PAD: u32 = 8;

/// Tile of the forward kernel: `nsg` subgroups of 16 query rows, `bk` keys staged per step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct CoopTiles {
    pub nsg: u32,
    pub bk: u32,
}

/// Developer knob for tuning on a new device: `SPARSE_ATTN_COOP=nsg,bk` (e.g. `2,64`).
pub const COOP_ENV: &str = "SPARSE_ATTN_COOP";

impl CoopTiles {
    /// The preferred tile that fits the device's workgroup memory at head dim `d` for the
    /// forward or the backwards (or the one `SPARSE_ATTN_COOP` asks for, where it fits). The
    /// forward takes eight subgroups of 16 rows per staged K/V tile where they fit (its Q tile
    /// is staged in rounds): 43.4 -> 34.2 ms against four at 8192, d 128 on the H200
    /// (bench/results/h200-peers-2026-12-02/); the backwards four: on the H100, two were 1.7x
    /// slower and one 5x (bench/results/h100-coop-tuning-2026-11-23.txt).
    fn default_for(d: u32, max_shared: u32, forward: bool) -> CoopTiles {
        let fits = |t: &CoopTiles| t.shared_bytes(d, forward) <= max_shared;
        let order: &[(u32, u32)] = match forward {
            true => &[
                (8, 32),
                (4, 32),
                (8, 16),
                (4, 16),
                (2, 32),
                (2, 16),
                (1, 16),
            ],
            false => &[(4, 32), (4, 16), (2, 32), (2, 16), (1, 16)],
        };
        let preferred = order
            .iter()
            .map(|&(nsg, bk)| CoopTiles { nsg, bk })
            .find(fits)
            .unwrap_or(CoopTiles { nsg: 1, bk: 16 });
        let Some((nsg, bk)) = pair_knob(COOP_ENV, &[1, 2, 4, 8], &[16, 32, 64, 128]) else {
            return preferred;
        };
        let t = CoopTiles { nsg, bk };
        if fits(&t) {
            return t;
        }
        log::warn!("{COOP_ENV}={nsg},{bk} does not fit at head_dim {d}; using {preferred:?}");
        preferred
    }

    pub(crate) fn rows(&self) -> u32 {
        16 * self.nsg
    }

    /// 16-column slices of O: divides both D/16 and BK/16 (with the key chunks, what decides
    /// PAIRS).
    fn out_slices(&self, d: u32) -> u32 {
        (1..=self.bk / 16)
            .rev()
            .find(|w| (d / 16).is_multiple_of(*w))
            .unwrap_or(1)
    }

    /// Halves of the staging area: the K and V tiles, or (the backwards) the Q tile where that
    /// is larger; the forward stages its Q tile in rounds.
    fn staging(&self, d: u32, forward: bool) -> u32 {
        match forward {
            true => 2 * self.bk * (d + 8),
            false => (2 * self.bk).max(self.rows()) * (d + 8),
        }
    }

    /// Two multiply-add chains at a time need an even number of key chunks and of O slices.
    fn pairs(&self, d: u32) -> bool {
        (self.bk / 16).is_multiple_of(2) && self.out_slices(d).is_multiple_of(2)
    }

    /// The dense forward's scratch padding: FORWARD_PAD, else SCRATCH_PAD.
    fn pad(forward: bool) -> u32 {
        if forward { FORWARD_PAD } else { SCRATCH_PAD }
    }

    fn shared_bytes(&self, d: u32, forward: bool) -> u32 {
        // Staging (f16), then per subgroup the f32 scratch and P (f16), rows padded.
        let sp = self.bk + Self::pad(forward);
        self.staging(d, forward) * 2 + self.nsg * 16 * (sp * 4 + (self.bk + 8) * 2)
    }

    /// The forward's differ from the backwards': its own staging size (Q staged in rounds of
    /// QR rows) and subgroup barriers for its scratch (SG_SYNC; coop_tile.wgsl's header says why
    /// the backwards keep workgroup barriers).
    fn constants(&self, d: u32, forward: bool) -> Vec<(&'static str, u32)> {
        vec![
            ("D", d),
            ("BQ", self.rows()),
            ("BK", self.bk),
            ("NSG", self.nsg),
            ("NT", SUBGROUP * self.nsg),
            ("DP", d + 8),
            ("DQ", d / 16),
            ("KV", self.staging(d, forward)),
            ("QR", 2 * self.bk),
            ("PAIRS", self.pairs(d) as u32),
            ("SG_SYNC", forward as u32),
            ("SPAD", Self::pad(forward)),
        ]
    }
}

/// Does the device run the cooperative-matrix kernels at all? The error says what is missing.
fn device_supported(gpu: &Gpu) -> Result<()> {
    let f = gpu.features();
    let need = [
        (wgpu::Features::SHADER_F16, "SHADER_F16"),
        (wgpu::Features::SUBGROUP, "SUBGROUP"),
        (
            wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX,
            "EXPERIMENTAL_COOPERATIVE_MATRIX",
        ),
        (wgpu::Features::SUBGROUP_BARRIER, "SUBGROUP_BARRIER"),
    ];
    for (feature, name) in need {
        if !f.contains(feature) {
            return Err(Error::Unsupported(format!(
                "the cooperative-matrix kernels need {name}, which this device does not offer"
            )));
        }
    }
    let f16 = wgpu::CooperativeScalarType::F16;
    let f32 = wgpu::CooperativeScalarType::F32;
    let has_16x16x16 = gpu
        .wgpu_adapter()
        .cooperative_matrix_properties()
        .iter()
        .any(|p| {
            (p.m_size, p.n_size, p.k_size) == (16, 16, 16) && p.ab_type == f16 && p.cr_type == f32
        });
    if !has_16x16x16 {
        return Err(Error::Unsupported(
            "the cooperative-matrix kernels need 16x16x16 f16 x f16 -> f32 matrices; this \
             device does not list them"
                .into(),
        ));
    }
    let (lo, hi) = gpu.adapter_subgroup_sizes();
    if (lo, hi) != (SUBGROUP, SUBGROUP) {
        return Err(Error::Unsupported(format!(
            "the cooperative-matrix kernels need subgroups of exactly {SUBGROUP} lanes; this \
             device has {lo}..{hi}"
        )));
    }
    Ok(())
}

fn head_dim_ok(d: usize) -> Result<()> {
    if !d.is_multiple_of(16) || !(16..=256).contains(&d) {
        return Err(Error::InvalidInput(format!(
            "head_dim = {d}: the cooperative-matrix kernels take multiples of 16 up to 256"
        )));
    }
    Ok(())
}

/// Does the device run the cooperative-matrix forward at head dim `d`? The error says what is
/// missing.
pub fn supported(gpu: &Gpu, d: usize) -> Result<()> {
    device_supported(gpu)?;
    head_dim_ok(d)?;
    let l = gpu.limits();
    let t = CoopTiles::default_for(d as u32, l.max_compute_workgroup_storage_size, true);
    if t.shared_bytes(d as u32, true) > l.max_compute_workgroup_storage_size
        || l.max_compute_invocations_per_workgroup < SUBGROUP * t.nsg
    {
        return Err(Error::Unsupported(format!(
            "the cooperative-matrix forward at head_dim {d} needs {} bytes of workgroup memory \
             and {} invocations; this device allows {} and {}",
            t.shared_bytes(d as u32, true),
            SUBGROUP * t.nsg,
            l.max_compute_workgroup_storage_size,
            l.max_compute_invocations_per_workgroup
        )));
    }
    Ok(())
}

/// The forward pipeline for head dim `d` and its tile (call [`supported`] first).
pub(crate) fn forward_pipeline(gpu: &Gpu, d: u32) -> Result<(Arc<Pipeline>, CoopTiles)> {
    let t = CoopTiles::default_for(d, gpu.limits().max_compute_workgroup_storage_size, true);
    let p = gpu.pipeline(&forward_key(d, t))?;
    Ok((p, t))
}

/// The dQ pipeline (`shaders/attention_coop_bwd.wgsl`), on the forward's tile.
pub(crate) fn dq_pipeline(gpu: &Gpu, d: u32) -> Result<(Arc<Pipeline>, CoopTiles)> {
    let t = CoopTiles::default_for(d, gpu.limits().max_compute_workgroup_storage_size, false);
    let p = gpu.pipeline(&backward_key(d, t, "dq_coop"))?;
    Ok((p, t))
}

/// The dK/dV pipeline: key tiles of the forward's rows, query tiles of its keys.
pub(crate) fn dkdv_pipeline(gpu: &Gpu, d: u32) -> Result<(Arc<Pipeline>, CoopTiles)> {
    let t = CoopTiles::default_for(d, gpu.limits().max_compute_workgroup_storage_size, false);
    let p = gpu.pipeline(&backward_key(d, t, "dkdv_coop"))?;
    Ok((p, t))
}

fn forward_key(d: u32, t: CoopTiles) -> PipelineKey {
    PipelineKey {
        file: "attention_coop.wgsl",
        entry: "fwd",
        constants: t.constants(d, true),
        checked: false,
        storage: Storage::F16,
    }
}

/// The dense backward's kernels (`dq_coop`, `dkdv_coop`) on their tile (`default_for`).
fn backward_key(d: u32, t: CoopTiles, entry: &'static str) -> PipelineKey {
    PipelineKey {
        file: "attention_coop_bwd.wgsl",
        entry,
        constants: t.constants(d, false),
        checked: false,
        storage: Storage::F16,
    }
}

/// Developer knob for the sparse forward's tile: `SPARSE_ATTN_COOP_SPARSE=nsg,bk` (e.g. `1,64`).
pub const SPARSE_COOP_ENV: &str = "SPARSE_ATTN_COOP_SPARSE";

/// Tile of the block-sparse forward (`shaders/sparse_coop.wgsl`): `nsg` tokens per workgroup,
/// one per subgroup, each with its own staging area; `bk` keys of the token's list per step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SparseTiles {
    pub nsg: u32,
    pub bk: u32,
}

impl SparseTiles {
    /// The first tile in order of preference that fits `max_shared` at head dim `d`. The
    /// forward: one token per workgroup, 16 keys a step (its subgroups never wait for each
    /// other, and a step's K/V rows in flight stay in registers: H200, 16384, d 128, B 16, k 16,
    /// G 16: 5.33 ms against 10.09 at two tokens of 32 keys, bench/results/h200-peers-2026-12-02/).
    /// The backward's dQ: 32 keys per step where possible (two multiply-add chains).
    fn for_dim(d: u32, max_shared: u32, forward: bool) -> Option<SparseTiles> {
        let knob = pair_knob(SPARSE_COOP_ENV, &[1, 2, 4, 8], &[16, 32, 64])
            .map(|(nsg, bk)| SparseTiles { nsg, bk });
        let order: &[(u32, u32)] = match forward {
            true => &[(1, 16)],
            false => &[(4, 32), (2, 32), (4, 16), (1, 32), (2, 16), (1, 16)],
        };
        let preferred = order.iter().map(|&(nsg, bk)| SparseTiles { nsg, bk });
        knob.into_iter()
            .chain(preferred)
            .find(|t| t.shared_bytes(d) <= max_shared)
    }

    fn shared_bytes(&self, d: u32) -> u32 {
        // Per subgroup: K and V staging (f16), the f32 scratch and P (f16), rows padded.
        let sp = self.bk + SCRATCH_PAD;
        self.nsg * (2 * self.bk * (d + 8) * 2 + 16 * (sp * 4 + (self.bk + 8) * 2))
    }

    /// The forward's use subgroup barriers for its scratch (SG_SYNC), the backward's dQ
    /// workgroup barriers.
    fn constants(
        &self,
        d: u32,
        blk: u32,
        has_bias: bool,
        forward: bool,
    ) -> Vec<(&'static str, u32)> {
        let t = CoopTiles {
            nsg: self.nsg,
            bk: self.bk,
        };
        vec![
            ("D", d),
            ("BLK", blk),
            ("BK", self.bk),
            ("NSG", self.nsg),
            ("NT", SUBGROUP * self.nsg),
            ("DP", d + 8),
            ("DQ", d / 16),
            ("PAIRS", t.pairs(d) as u32),
            ("HAS_BIAS", has_bias as u32),
            ("KV", self.nsg * 2 * self.bk * (d + 8)),
            // attn_params.wgsl's key_end reads BQ; the sparse kernel never calls it.
            ("BQ", 16),
            ("SG_SYNC", forward as u32),
            ("SPAD", SCRATCH_PAD),
        ]
    }
}

/// Query heads per kv head the sparse kernel takes: they are the 16 rows of its matrices.
const SPARSE_MAX_GROUP: usize = 16;

/// Does the device run the cooperative-matrix block-sparse kernels for head dim `d`, `g` query
/// heads per kv head and blocks of `blk` keys? The error says what is missing.
pub fn sparse_supported(gpu: &Gpu, d: usize, g: usize, blk: usize) -> Result<()> {
    device_supported(gpu)?;
    head_dim_ok(d)?;
    if g > SPARSE_MAX_GROUP {
        return Err(Error::Unsupported(format!(
            "the cooperative-matrix sparse kernels take up to {SPARSE_MAX_GROUP} query heads per \
             kv head (the rows of one matrix), not {g}"
        )));
    }
    if !blk.is_multiple_of(16) {
        return Err(Error::Unsupported(format!(
            "the cooperative-matrix sparse kernels take blocks of a multiple of 16 keys, not {blk}"
        )));
    }
    let max_shared = gpu.limits().max_compute_workgroup_storage_size;
    if SparseTiles::for_dim(d as u32, max_shared, true).is_none() {
        return Err(Error::Unsupported(format!(
            "the cooperative-matrix sparse kernels at head_dim {d} need more than the \
             {max_shared} bytes of workgroup memory this device has"
        )));
    }
    Ok(())
}

/// The sparse forward pipeline and its tile (call [`sparse_supported`] first).
pub(crate) fn sparse_forward_pipeline(
    gpu: &Gpu,
    d: u32,
    blk: u32,
    has_bias: bool,
) -> Result<(Arc<Pipeline>, SparseTiles)> {
    let max_shared = gpu.limits().max_compute_workgroup_storage_size;
    let t = SparseTiles::for_dim(d, max_shared, true).ok_or_else(|| {
        Error::Unsupported(format!(
            "the cooperative-matrix sparse forward at head_dim {d} does not fit"
        ))
    })?;
    let p = gpu.pipeline(&sparse_key(d, blk, has_bias, t))?;
    Ok((p, t))
}

/// Layout of the sparse dK/dV kernel: each key block in KC = BLK/16 chunks of 16 keys (one
/// subgroup each), NPH subgroups per chunk taking alternate tiles of TPT = 16/G tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SparseBwdTiles {
    pub kc: u32,
    pub nph: u32,
    pub tpt: u32,
}

impl SparseBwdTiles {
    /// Four subgroups per workgroup where the block allows (KC <= 4), else one per chunk; the
    /// first that fits `max_shared`.
    fn new(d: u32, g: u32, blk: u32, max_shared: u32) -> Option<SparseBwdTiles> {
        let kc = blk / 16;
        // Developer knob: subgroups per key chunk (1, 2 or 4).
        let knob: Option<u32> = crate::ops::tiles::tuning("SPARSE_ATTN_COOP_SPARSE_NPH", None)
            .and_then(|n| n.first().copied());
        [4, 2, 1]
            .into_iter()
            .filter(|nph| knob.is_none_or(|k| k == *nph))
            .filter(|nph| kc * nph <= 8.max(kc) && (kc * nph <= 4 || *nph == 1))
            .map(|nph| SparseBwdTiles {
                kc,
                nph,
                tpt: 16 / g,
            })
            .find(|t| t.shared_bytes(d) <= max_shared)
    }

    fn nsg(&self) -> u32 {
        self.kc * self.nph
    }

    fn staging(&self, d: u32) -> u32 {
        // The rounds' Q and dO rows, or (at the start) the block's K or V rows.
        (32 * self.nph).max(16 * self.kc) * (d + 8)
    }

    fn shared_bytes(&self, d: u32) -> u32 {
        let nt = SUBGROUP * self.nsg();
        // Staging (f16), per subgroup the f32 scratch and the f16 P of a 16-column tile, the
        // token line (flags, list, pending) and three per-column values per tile.
        self.staging(d) * 2
            + self.nsg() * 16 * ((16 + SCRATCH_PAD) * 4 + 24 * 2)
            + 4 * (nt + (nt + self.nph * self.tpt).next_multiple_of(16) + 16)
            + self.nph * 16 * 12
    }

    fn constants(&self, d: u32, blk: u32, has_bias: bool) -> Vec<(&'static str, u32)> {
        vec![
            ("D", d),
            ("BLK", blk),
            ("BK", 16),
            ("NSG", self.nsg()),
            ("NT", SUBGROUP * self.nsg()),
            ("DP", d + 8),
            ("DQ", d / 16),
            ("PAIRS", 0),
            ("SPAD", SCRATCH_PAD),
            ("HAS_BIAS", has_bias as u32),
            ("KV", self.staging(d)),
            ("BQ", 16),
            ("KC", self.kc),
            ("NPH", self.nph),
            ("TPT", self.tpt),
            ("SG_SYNC", 0),
        ]
    }

    /// Threads of a dK/dV workgroup.
    pub(crate) fn threads(&self) -> u32 {
        SUBGROUP * self.nsg()
    }
}

/// Does the device run the cooperative-matrix block-sparse backward? Beyond the forward's needs
/// (`sparse_supported`), its dK/dV kernel holds a block's chunks in one workgroup.
pub fn sparse_backward_supported(gpu: &Gpu, d: usize, g: usize, blk: usize) -> Result<()> {
    sparse_supported(gpu, d, g, blk)?;
    let l = gpu.limits();
    let Some(t) = SparseBwdTiles::new(
        d as u32,
        g as u32,
        blk as u32,
        l.max_compute_workgroup_storage_size,
    ) else {
        return Err(Error::Unsupported(format!(
            "the cooperative-matrix sparse backward for blocks of {blk} keys at head_dim {d} \
             needs more than the {} bytes of workgroup memory this device has",
            l.max_compute_workgroup_storage_size
        )));
    };
    if t.threads() > l.max_compute_invocations_per_workgroup
        || t.threads() > l.max_compute_workgroup_size_x
    {
        return Err(Error::Unsupported(format!(
            "the cooperative-matrix sparse backward for blocks of {blk} keys uses {} invocations \
             per workgroup; this device allows {}",
            t.threads(),
            l.max_compute_invocations_per_workgroup
        )));
    }
    Ok(())
}

/// The sparse backward's pipeline keys (call [`sparse_backward_supported`] first): dQ with the
/// tokens one of its workgroups takes, then dK/dV. Keys, not pipelines: `Rows` runs the dK/dV
/// kernel alone, and a pipeline costs a compilation.
pub(crate) fn sparse_backward_keys(
    gpu: &Gpu,
    d: u32,
    g: u32,
    blk: u32,
    has_bias: bool,
) -> Result<(PipelineKey, u32, PipelineKey)> {
    let max_shared = gpu.limits().max_compute_workgroup_storage_size;
    let unfit = || {
        Error::Unsupported(format!(
            "the cooperative-matrix sparse backward at head_dim {d}, blocks of {blk} does not fit"
        ))
    };
    let t = SparseTiles::for_dim(d, max_shared, false).ok_or_else(unfit)?;
    let b = SparseBwdTiles::new(d, g, blk, max_shared).ok_or_else(unfit)?;
    let (dq, dkdv) = sparse_bwd_keys(d, blk, has_bias, t, b);
    Ok((dq, t.nsg, dkdv))
}

fn sparse_bwd_keys(
    d: u32,
    blk: u32,
    has_bias: bool,
    t: SparseTiles,
    b: SparseBwdTiles,
) -> (PipelineKey, PipelineKey) {
    // The dQ module declares dK/dV's workgroup arrays too: give it their sizes.
    let mut dq_consts = t.constants(d, blk, has_bias, false);
    dq_consts.extend([("KC", b.kc), ("NPH", b.nph), ("TPT", b.tpt)]);
    let key = |entry, constants| PipelineKey {
        file: "sparse_coop_bwd.wgsl",
        entry,
        constants,
        checked: false,
        storage: Storage::F16,
    };
    (
        key("dq_coop", dq_consts),
        key("dkdv_coop", b.constants(d, blk, has_bias)),
    )
}

fn sparse_key(d: u32, blk: u32, has_bias: bool, t: SparseTiles) -> PipelineKey {
    PipelineKey {
        file: "sparse_coop.wgsl",
        entry: "fwd",
        constants: t.constants(d, blk, has_bias, true),
        checked: false,
        storage: Storage::F16,
    }
}

/// Developer knob for the block scores' tile: `SPARSE_ATTN_COOP_SCORES=nsg,bk` (e.g. `8,32`).
pub const SCORES_COOP_ENV: &str = "SPARSE_ATTN_COOP_SCORES";

/// Tile of the block scores on tensor cores (`shaders/block_scores_coop.wgsl`): `nsg`
/// subgroups of 16 query rows (whole tokens: the group divides 16·nsg), `bk` pooled keys staged
/// a step (a multiple of 32: two multiply-add chains).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ScoreTiles {
    pub nsg: u32,
    pub bk: u32,
}

impl ScoreTiles {
    /// The first tile in order of preference that fits `max_shared` at head dim `d` and holds
    /// whole tokens of `g` query heads.
    fn for_shape(d: u32, g: u32, max_shared: u32) -> Option<ScoreTiles> {
        let knob = pair_knob(SCORES_COOP_ENV, &[1, 2, 4, 8], &[32, 64, 128])
            .map(|(nsg, bk)| ScoreTiles { nsg, bk });
        // H200, 16384 tokens, d 128, G 16, blocks of 16 (bench/results/h200-select-2026-12-02/):
        // 8x32 3.47 ms, 4x32 3.54, 2x32 7.01, 1x32 18.3; 4x64 7.75, 2x64 23.3, 4x128 7.79.
        let order = [(8, 32), (4, 32), (2, 32), (1, 32)];
        knob.into_iter()
            .chain(order.map(|(nsg, bk)| ScoreTiles { nsg, bk }))
            .find(|t| (16 * t.nsg).is_multiple_of(g) && t.shared_bytes(d) <= max_shared)
    }

    pub(crate) fn rows(&self) -> u32 {
        16 * self.nsg
    }

    fn shared_bytes(&self, d: u32) -> u32 {
        // The staged key tile (f16; the Q tile goes through it in rounds), the f32 scratch.
        self.bk * (d + 8) * 2 + self.rows() * (self.bk + 4) * 4
    }

    /// The tile constants (the selection adds its own: BLK, NBP, NOSA, VARLEN).
    pub(crate) fn constants(&self, d: u32) -> Vec<(&'static str, u32)> {
        vec![
            ("D", d),
            ("DQ", d / 16),
            ("DP", d + 8),
            ("BK", self.bk),
            ("NSG", self.nsg),
            ("NT", SUBGROUP * self.nsg),
            ("BQ", self.rows()),
            ("KV", self.bk * (d + 8)),
            ("QR", self.bk),
        ]
    }
}

/// Does the device run the block scores on tensor cores for head dim `d` and `g` query heads
/// per kv head? The error says what is missing.
pub(crate) fn scores_supported(gpu: &Gpu, d: usize, g: usize) -> Result<ScoreTiles> {
    device_supported(gpu)?;
    head_dim_ok(d)?;
    let l = gpu.limits();
    ScoreTiles::for_shape(d as u32, g as u32, l.max_compute_workgroup_storage_size)
        .filter(|t| SUBGROUP * t.nsg <= l.max_compute_invocations_per_workgroup)
        .ok_or_else(|| {
            Error::Unsupported(format!(
                "the tensor-core block scores take groups of query heads that divide 128 (whole                  tokens in a tile of 16-row matrices) and a tile that fits {} bytes of workgroup                  memory at head_dim {d}; this selection has {g} query heads per kv head",
                l.max_compute_workgroup_storage_size
            ))
        })
}

/// The block scores' pipeline key: the tile's constants and the selection's (blocks of `blk`,
/// NOSA's bindings, `g` query heads per kv head). Prefill only: select_common.wgsl's decoding
/// lengths (VARLEN) stay off.
pub(crate) fn scores_key(d: u32, t: ScoreTiles, blk: u32, nosa: bool, g: u32) -> PipelineKey {
    let mut constants = t.constants(d);
    // Where G divides 16 a subgroup's rows are whole tokens, summed by shuffles over log2 G
    // rounds (H200, 16384 tokens, d 128, G 16: see docs/BENCHMARKS.md).
    let shuffled = 16 % g == 0;
    constants.extend([
        ("GS", shuffled as u32),
        ("GL", if shuffled { g.trailing_zeros() } else { 0 }),
        ("BLK", blk),
        // Sizes only select_common.wgsl's top-k array, which this entry does not use; 16 keeps
        // every workgroup array a multiple of 64 bytes (see the test below).
        ("NBP", 16),
        ("NOSA", nosa as u32),
        ("VARLEN", 0),
    ]);
    PipelineKey {
        file: "block_scores_coop.wgsl",
        entry: "block_scores_coop",
        constants,
        checked: false,
        storage: Storage::F16,
    }
}

#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests {
    use super::*;
    use wgpu::naga;

    /// Every head dim gets a tile that fits WebGPU-class 48 KiB, with O slices that divide both
    /// D/16 and BK/16 (the kernel's accumulation rounds assume it).
    #[test]
    fn tiles_fit_and_slices_divide() {
        for d in (16..=256).step_by(16) {
            for forward in [true, false] {
                let t = CoopTiles::default_for(d, 48 * 1024, forward);
                assert!(t.shared_bytes(d, forward) <= 48 * 1024, "d={d}: {t:?}");
                let w = t.out_slices(d);
                assert!(
                    (d / 16).is_multiple_of(w) && (t.bk / 16).is_multiple_of(w),
                    "d={d}"
                );
            }
        }
        // What the H200 runs at d 64 and 128: eight subgroups forward, four backward
        // (bench/results/h200-peers-2026-12-02/, h100-coop-tuning-2026-11-23.txt).
        for d in [64, 128] {
            assert_eq!(
                CoopTiles::default_for(d, 48 * 1024, true),
                CoopTiles { nsg: 8, bk: 32 }
            );
            assert_eq!(
                CoopTiles::default_for(d, 48 * 1024, false),
                CoopTiles { nsg: 4, bk: 32 }
            );
        }
        // Two chains need an even number of key chunks and of O slices (d 48: 3 slices).
        let t = CoopTiles { nsg: 4, bk: 32 };
        assert!(t.pairs(128) && t.pairs(64) && !t.pairs(48) && !t.pairs(16));
        assert!(!CoopTiles { nsg: 4, bk: 16 }.pairs(128));
    }

    #[test]
    fn sparse_tiles_fit() {
        for d in (16..=256).step_by(16) {
            for forward in [true, false] {
                let t = SparseTiles::for_dim(d, 48 * 1024, forward)
                    .expect("every head dim fits 48 KiB");
                assert!(t.shared_bytes(d) <= 48 * 1024, "d={d}: {t:?}");
            }
            // The forward: one token of 16 keys per step everywhere.
            assert_eq!(
                SparseTiles::for_dim(d, 48 * 1024, true),
                Some(SparseTiles { nsg: 1, bk: 16 })
            );
        }
        // The backward's dQ: four tokens of 32 keys per step up to d 48; two at d 64 and 128
        // (42 KiB at 128).
        assert_eq!(
            SparseTiles::for_dim(48, 48 * 1024, false),
            Some(SparseTiles { nsg: 4, bk: 32 })
        );
        assert_eq!(
            SparseTiles::for_dim(64, 48 * 1024, false),
            Some(SparseTiles { nsg: 2, bk: 32 })
        );
        assert_eq!(
            SparseTiles::for_dim(128, 48 * 1024, false),
            Some(SparseTiles { nsg: 2, bk: 32 })
        );
    }

    /// The sparse kernel through naga to SPIR-V at every block size and head dim class.
    #[test]
    fn sparse_coop_shader_compiles_to_spirv() {
        for (d, blk, bias) in [
            (16, 16, true),
            (48, 32, false),
            (64, 16, false),
            (128, 64, true),
            (256, 128, false),
        ] {
            let t = SparseTiles::for_dim(d, 48 * 1024, true).unwrap();
            let src = crate::gpu::preprocess(&sparse_key(d, blk, bias, t)).unwrap();
            spirv(&src, &format!("sparse d={d} blk={blk}"));
        }
    }

    /// The backward kernels (Variant::Coop as a backward variant) get through naga for every
    /// head dim.
    #[test]
    fn coop_dq_shader_compiles_to_spirv() {
        for d in [16, 48, 64, 128, 256] {
            let t = CoopTiles::default_for(d, 48 * 1024, false);
            let src = crate::gpu::preprocess(&backward_key(d, t, "dq_coop")).unwrap();
            spirv(&src, &format!("dq d={d}"));
            let key = backward_key(d, t, "dkdv_coop");
            let src = crate::gpu::preprocess(&key).unwrap();
            spirv(&src, &format!("dkdv d={d}"));
        }
    }

    /// The sparse backward kernels through naga for block sizes, head dims and groups; and
    /// their layouts fit 48 KiB where the device limits allow.
    #[test]
    fn sparse_coop_backward_compiles_to_spirv() {
        for (d, g, blk, bias) in [
            (16, 16, 16, true),
            (48, 3, 32, false),
            (64, 16, 16, false),
            (128, 16, 16, false),
            (128, 4, 64, true),
            (64, 1, 128, false),
        ] {
            let t = SparseTiles::for_dim(d, 48 * 1024, false).unwrap();
            let b = SparseBwdTiles::new(d, g, blk, 48 * 1024)
                .unwrap_or_else(|| panic!("d={d} blk={blk}: no backward layout fits"));
            assert!(
                b.shared_bytes(d) <= 48 * 1024 && b.threads() <= 256,
                "{b:?}"
            );
            let (dq, dkdv) = sparse_bwd_keys(d, blk, bias, t, b);
            for key in [dq, dkdv] {
                let src = crate::gpu::preprocess(&key).unwrap();
                spirv(&src, &format!("sparse {} d={d} g={g} blk={blk}", key.entry));
            }
        }
        // SSA's setting: four subgroups, each on its own tile of one token's 16 heads.
        assert_eq!(
            SparseBwdTiles::new(128, 16, 16, 48 * 1024),
            Some(SparseBwdTiles {
                kc: 1,
                nph: 4,
                tpt: 1
            })
        );
    }

    /// The block scores through naga for head dims, groups and the selection's variants; and
    /// every head dim gets a tile at the groups that divide 128.
    #[test]
    fn coop_scores_compile_to_spirv() {
        for d in [16, 48, 64, 128, 256] {
            for g in [1, 2, 4, 8, 16, 32, 64, 128] {
                let t = ScoreTiles::for_shape(d, g, 48 * 1024)
                    .unwrap_or_else(|| panic!("d={d} g={g}: no tile fits"));
                assert!(t.shared_bytes(d) <= 48 * 1024 && (t.rows()).is_multiple_of(g));
            }
            assert_eq!(ScoreTiles::for_shape(d, 3, 48 * 1024), None);
        }
        assert_eq!(
            ScoreTiles::for_shape(128, 16, 48 * 1024),
            Some(ScoreTiles { nsg: 8, bk: 32 })
        );
        for (d, g, nosa) in [
            (16, 1, false),
            (48, 4, true),
            (64, 16, false),
            (128, 16, false),
            (256, 32, true),
        ] {
            let t = ScoreTiles::for_shape(d, g, 48 * 1024).unwrap();
            let src = crate::gpu::preprocess(&scores_key(d, t, 16, nosa, g)).unwrap();
            spirv(&src, &format!("scores d={d} g={g}"));
        }
    }

    /// Cooperative loads from workgroup memory read the wrong data on the H100 (driver 580)
    /// when a workgroup array of the kernel is not a multiple of 64 bytes
    /// (docs/BENCHMARKS.md, "A driver pitfall"). Every coop kernel keeps to that.
    #[test]
    fn coop_workgroup_arrays_are_multiples_of_64_bytes() {
        let mut keys = Vec::new();
        for d in [16, 48, 64, 128, 256] {
            keys.push(forward_key(d, CoopTiles::default_for(d, 48 * 1024, true)));
            let t = CoopTiles::default_for(d, 48 * 1024, false);
            for entry in ["dq_coop", "dkdv_coop"] {
                keys.push(backward_key(d, t, entry));
            }
            keys.push(sparse_key(
                d,
                16,
                true,
                SparseTiles::for_dim(d, 48 * 1024, true).unwrap(),
            ));
            let st = SparseTiles::for_dim(d, 48 * 1024, false).unwrap();
            for g in [16, 3] {
                let b = SparseBwdTiles::new(d, g, 16, 48 * 1024).unwrap();
                let (dq, dkdv) = sparse_bwd_keys(d, 16, false, st, b);
                keys.extend([dq, dkdv]);
            }
        }
        for d in [16, 48, 64, 128, 256] {
            for g in [1, 16, 32] {
                let t = ScoreTiles::for_shape(d, g, 48 * 1024).unwrap();
                keys.push(scores_key(d, t, 16, true, g));
            }
        }
        for key in keys {
            let src = crate::gpu::preprocess(&key).unwrap();
            let module = naga::front::wgsl::parse_str(&src).unwrap();
            for (_, var) in module.global_variables.iter() {
                if var.space == naga::AddressSpace::WorkGroup {
                    let size = module.types[var.ty].inner.size(module.to_ctx());
                    assert!(
                        size.is_multiple_of(64),
                        "{} {}: workgroup `{}` is {size} bytes",
                        key.file,
                        key.entry,
                        var.name.as_deref().unwrap_or("?")
                    );
                }
            }
        }
    }

    /// Through naga to SPIR-V with the options the driver gets (unchecked, every entry).
    fn spirv(src: &str, what: &str) {
        crate::gpu::stats::spirv(src, false, None, what).unwrap_or_else(|e| panic!("{e}"));
    }

    /// The kernel must get through naga (parse, validate, SPIR-V) on any machine, so CI catches
    /// shader errors even where no device runs it.
    #[test]
    fn coop_shader_compiles_to_spirv() {
        for d in [16, 48, 64, 128, 192, 256] {
            let t = CoopTiles::default_for(d, 48 * 1024, true);
            let src = crate::gpu::preprocess(&forward_key(d, t)).unwrap();
            spirv(&src, &format!("d={d}"));
            assert!(t.shared_bytes(d, true) <= 48 * 1024, "d={d}");
        }
    }
}
