//! Tile policy: the `Tiles` of the portable kernels (their workgroup layout, memory and WGSL
//! constants), which tile each kernel family takes on a device (dense, sparse, block scores),
//! and the one parser of the developer tuning variables (`SPARSE_ATTN_TILES`,
//! `SPARSE_ATTN_SPARSE_TILES`, `SPARSE_ATTN_COOP`, `SPARSE_ATTN_COOP_SPARSE_NPH`,
//! `SPARSE_ATTN_TOPK`, `SPARSE_ATTN_ROWS_SG`, `SPARSE_ATTN_SCORE_WGS`).

use crate::ops::attention::Variant;

/// The numbers of entry `name` in a tuning variable: `name:n,n,..` entries joined by `;`, or,
/// with `name` None, the whole value `n,n,..`. Every tuning knob is read here, the same way;
/// the caller checks the ranges its kernel takes (and warns when it ignores an entry).
pub(crate) fn tuning(var: &str, name: Option<&str>) -> Option<Vec<u32>> {
    let spec = std::env::var(var).ok()?;
    let part = match name {
        Some(name) => spec
            .split(';')
            .find_map(|p| p.trim().strip_prefix(name)?.strip_prefix(':'))?
            .to_string(),
        None => spec.trim().to_string(),
    };
    let n: Option<Vec<u32>> = part.split(',').map(|x| x.trim().parse().ok()).collect();
    if n.is_none() {
        log::warn!("ignoring {var} entry `{part}`: not a list of numbers");
    }
    n
}

/// An `nsg,bk` pair (subgroups per workgroup, keys per step) from tuning variable `var`, when
/// both are among the values the kernel takes; otherwise a warning that names them, and None.
/// The tensor-core tiles' knobs (`SPARSE_ATTN_COOP`, `_COOP_SPARSE`, `_COOP_SCORES`) read this.
pub(crate) fn pair_knob(var: &str, nsgs: &[u32], bks: &[u32]) -> Option<(u32, u32)> {
    let n = tuning(var, None)?;
    match n[..] {
        [nsg, bk] if nsgs.contains(&nsg) && bks.contains(&bk) => Some((nsg, bk)),
        _ => {
            log::warn!("ignoring {var}={n:?} (want nsg in {nsgs:?} and bk in {bks:?})");
            None
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Fwd,
    Dq,
    Dkdv,
}

/// Tile of one kernel. `tr` thread rows of TM rows each (`rows` = tr·TM logit rows per
/// workgroup; the dense kernels use 16), TC threads per row (see `tc`), `cols` logit
/// columns, DC head dims staged per step, PC inner rows staged per step of the second product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Tiles {
    pub tm: u32,
    pub tr: u32,
    /// Threads per row; 0 = `Tiles::tc(d)`.
    pub tc: u32,
    pub cols: u32,
    pub dc: u32,
    pub pc: u32,
}

pub(crate) const THREAD_ROWS: u32 = 16;

/// Developer knob for tuning the xl variant on a new device, e.g.
/// `SPARSE_ATTN_TILES=fwd:4,64,16,16;dq:4,64,8,16;dkdv:4,32,8,8` (tm,cols,dc,pc per kernel);
/// `score:8,64,16,4` sets the block-score tile of `ops::select` the same way.
pub const TILES_ENV: &str = "SPARSE_ATTN_TILES";

/// `name:tm,cols,dc,pc` from `SPARSE_ATTN_TILES` (16 thread rows), checked only for the
/// ranges every kernel takes; callers check what their kernel needs on top.
pub(crate) fn tiles_override(name: &str) -> Option<Tiles> {
    let n = tuning(TILES_ENV, Some(name))?;
    let t = Tiles {
        tr: THREAD_ROWS,
        tc: 0,
        tm: *n.first()?,
        cols: *n.get(1)?,
        dc: *n.get(2)?,
        pc: *n.get(3)?,
    };
    let ok = [1, 2, 4, 8].contains(&t.tm)
        && [16, 32, 64, 128].contains(&t.cols)
        && [8, 16, 32].contains(&t.dc)
        && [4, 8, 16, 32].contains(&t.pc)
        && t.pc <= t.cols;
    if !ok {
        log::warn!("ignoring {TILES_ENV} entry `{name}:{n:?}` (out of the tested ranges)");
        return None;
    }
    Some(t)
}

impl Tiles {
    pub(crate) fn of(kind: Kind, variant: Variant, d: u32) -> Tiles {
        let t = |tm, cols, dc, pc| Tiles {
            tm,
            tr: THREAD_ROWS,
            tc: 0,
            cols,
            dc,
            pc,
        };
        match (kind, variant) {
            // Measured on an H100 (docs/BENCHMARKS.md): taller tiles (TM = 8) pay off most.
            (Kind::Fwd, Variant::Portable) => t(4, 32, 16, 8),
            (Kind::Dq, Variant::Portable) => t(2, 32, 8, 8),
            (Kind::Dkdv, Variant::Portable) => t(2, 32, 8, 8),
            (Kind::Fwd, Variant::Large) => t(4, 64, 16, 16),
            (Kind::Dq, Variant::Large) => t(4, 64, 8, 16),
            (Kind::Dkdv, Variant::Large) => t(4, 32, 8, 8),
            // The cooperative-matrix kernels have tiles of their own (ops::coop); callers check
            // for Coop before asking.
            (_, Variant::Xl | Variant::Coop) => tiles_override(match kind {
                Kind::Fwd => "fwd",
                Kind::Dq => "dq",
                Kind::Dkdv => "dkdv",
            })
            .unwrap_or(match (kind, Self::tc(d) <= 4) {
                (Kind::Fwd, false) => t(8, 64, 16, 16),
                (Kind::Dq, false) => t(4, 64, 16, 16),
                (Kind::Dkdv, false) => t(8, 32, 8, 8),
                // Head dims whose rows split over 4 threads or fewer (16, 48, 80, ...): each
                // thread holds cols / 4 logit columns, so narrower and shorter tiles. H200,
                // training's model (d 48, batch 16, 2048 tokens, `bench/train-tiles-sweep.sh`,
                // docs/BENCHMARKS.md): forward 8.54 -> 3.30 ms, dQ -4.4 ms, dK/dV -13 ms.
                (Kind::Fwd, true) => t(4, 32, 16, 8),
                (Kind::Dq, true) => t(2, 32, 16, 8),
                (Kind::Dkdv, true) => t(2, 32, 8, 8),
            }),
        }
    }

    pub(crate) fn rows(&self) -> u32 {
        self.tr * self.tm
    }

    /// Threads per row: the largest power of two up to 16 that divides d/4, so every thread owns
    /// whole vec4 output columns and the column tiles (multiples of 16) split evenly.
    pub(crate) fn tc(d: u32) -> u32 {
        1 << (d / 4).trailing_zeros().min(4)
    }

    /// Threads per row of this tile (the default for `d`, or the tile's own).
    pub(crate) fn tcols(&self, d: u32) -> u32 {
        if self.tc > 0 { self.tc } else { Self::tc(d) }
    }

    pub(crate) fn threads(&self, d: u32) -> u32 {
        self.tr * self.tcols(d)
    }

    /// Workgroup arrays (in vec4) as the shaders declare them.
    pub(crate) fn shared(&self, kind: Kind, d: u32) -> [(&'static str, u32); 3] {
        let dsv = self.dc / 4 + 1;
        let (r, c, d4) = (self.rows(), self.cols, d / 4);
        match kind {
            Kind::Fwd => [
                (
                    "SH0",
                    ((r + c) * dsv)
                        .max((r * self.tcols(d)).div_ceil(4))
                        .max(self.pc * d4),
                ),
                ("SH1", r * c / 4),
                ("SH2", 1),
            ],
            Kind::Dq => [
                ("SH0", (2 * (r + c) * dsv).max(self.pc * d4)),
                ("SH1", r * c / 4),
                ("SH2", 1),
            ],
            Kind::Dkdv => [
                ("SH0", (2 * (r + c) * dsv).max(2 * self.pc * d4)),
                ("SH1", r * c / 4),
                ("SH2", (r * c + 2 * c) / 4),
            ],
        }
    }

    pub(crate) fn shared_bytes(&self, kind: Kind, d: u32) -> u32 {
        16 * self.shared(kind, d).iter().map(|(_, n)| n).sum::<u32>()
    }

    /// The tiles for head dim `d` if they fit `max_shared`. The portable variant must run
    /// everywhere, so it shrinks for large head dims: first the product chunk (down to 4), then
    /// the column tile (down to 16). The larger variants fit as they are or not at all.
    pub(crate) fn fitted(kind: Kind, variant: Variant, d: u32, max_shared: u32) -> Option<Tiles> {
        let mut t = Tiles::of(kind, variant, d);
        // The head-dim chunk must divide d (a tuning override could ask otherwise).
        if !d.is_multiple_of(t.dc) {
            return None;
        }
        while t.shared_bytes(kind, d) > max_shared {
            if variant != Variant::Portable {
                return None;
            } else if t.pc > 4 {
                t.pc /= 2;
            } else if t.cols > 16 && t.cols / 2 >= Self::tc(d) {
                t.cols /= 2;
                t.pc = t.pc.min(t.cols);
            } else {
                return None;
            }
        }
        Some(t)
    }

    pub(crate) fn constants(&self, kind: Kind, d: u32) -> Vec<(&'static str, u32)> {
        let tc = self.tcols(d);
        let (bq, bk) = match kind {
            Kind::Fwd | Kind::Dq => (self.rows(), self.cols),
            Kind::Dkdv => (self.cols, self.rows()),
        };
        let mut c = vec![
            ("D", d),
            ("BQ", bq),
            ("BK", bk),
            ("TM", self.tm),
            ("TC", tc),
            ("TN", self.cols / tc),
            ("TD4", d / 4 / tc),
            ("NT", self.threads(d)),
            ("DCV", self.dc / 4),
            ("DSV", self.dc / 4 + 1),
            ("PC", self.pc),
        ];
        c.extend(self.shared(kind, d));
        c
    }
}

// ---- Block-sparse kernels ----

/// Developer knob for tuning the sparse kernels on a new device, e.g.
/// `SPARSE_ATTN_SPARSE_TILES=fwd:4,4,64,16,16;dq:4,4,64,8,16;dkdv:4,16,16,8,16`
/// (tm, thread rows, cols, dc, pc[, threads per row] per kernel; fwd/dq rows must cover the group's heads, dK/dV
/// rows must equal the block size).
pub const SPARSE_TILES_ENV: &str = "SPARSE_ATTN_SPARSE_TILES";

/// Tiles of the forward, dQ and dK/dV kernels for `g` query heads per kv head, blocks of `blk`.
pub(crate) fn sparse_tiles(g: u32, blk: u32, d: u32) -> [Tiles; 3] {
    // Forward and dQ: rows are the group's heads (padded to a power of two): up to 4 per thread
    // (more only past 16 thread rows). Key tiles: up to 64 keys.
    let rows = g.next_power_of_two();
    let tm = rows.clamp(1, 4).max(rows / 16);
    let cols = blk.min(64);
    // Measured on the H100 at seq 16384, G 16, d 128 (docs/BENCHMARKS.md): 4 rows x 4 thread
    // rows beat 2 x 8 by 2% and 1 x 16 by 1.6x; 32-dim staging steps help the forward, 16 the dQ.
    let fwd = Tiles {
        tm,
        tr: rows / tm,
        tc: 0,
        cols,
        dc: if d.is_multiple_of(32) { 32 } else { 16 },
        pc: cols.min(16),
    };
    let dq = Tiles { dc: 16, ..fwd };
    // dK/dV: rows are the block's keys, columns (token, head) pairs of the tokens that selected
    // the block: up to 64, at least one token's heads (and TC columns).
    let cols = rows.max(Tiles::tc(d)).max(64);
    let dkdv = Tiles {
        tm: blk / 16,
        tr: 16,
        tc: 0,
        cols,
        dc: 8,
        pc: 8,
    };
    let mut out = [fwd, dq, dkdv];
    {
        for (i, name) in ["fwd", "dq", "dkdv"].iter().enumerate() {
            let Some(n) = tuning(SPARSE_TILES_ENV, Some(name)) else {
                continue;
            };
            // Optional sixth number: threads per row (default: from head_dim).
            let tc = n.get(5).copied().unwrap_or(Tiles::tc(d));
            let ok = (n.len() == 5 || n.len() == 6)
                && n.iter().all(|x| x.is_power_of_two())
                && tc <= Tiles::tc(d)
                && tc >= 4
                && tc <= n[2]
                && n[0] <= 8
                && n[1] <= 32
                && (16..=128).contains(&n[2])
                && [8, 16, 32].contains(&n[3])
                && d.is_multiple_of(n[3])
                && (4..=n[2]).contains(&n[4])
                && if i < 2 {
                    n[0] * n[1] >= g && n[2] <= blk
                } else {
                    n[0] * n[1] == blk && n[2] >= g && n[2] >= Tiles::tc(d)
                };
            if ok {
                out[i] = Tiles {
                    tm: n[0],
                    tr: n[1],
                    tc,
                    cols: n[2],
                    dc: n[3],
                    pc: n[4],
                };
            } else {
                log::warn!("ignoring {SPARSE_TILES_ENV} entry `{name}:{n:?}`");
            }
        }
    }
    out
}

/// Shrink a tile's product chunk, then its head-dim chunk, until it fits `max_shared` (with
/// `extra` bytes of other workgroup variables).
pub(crate) fn fit_sparse(
    mut t: Tiles,
    kind: Kind,
    d: u32,
    max_shared: u32,
    extra: u32,
) -> Option<Tiles> {
    while t.shared_bytes(kind, d) + extra > max_shared {
        if t.pc > 4 {
            t.pc /= 2;
        } else if t.dc > 8 {
            t.dc /= 2;
        } else {
            return None;
        }
    }
    Some(t)
}

// ---- Block scores of the selection ----

/// Tiles of the block-score kernel, largest first; the first that fits the device and has rows
/// for the whole group wins, or with `rows` (a decoding step's rows) the smallest that holds
/// them; the `score` entry of [`TILES_ENV`] before either. Rows are (token, head) pairs,
/// columns pooled keys.
pub(crate) fn score_tiles(g: u32, d: u32, max_shared: u32, rows: Option<u32>) -> Option<Tiles> {
    let t = |tm, cols, dc| Tiles {
        tm,
        tr: 16,
        tc: 0,
        cols,
        dc,
        pc: 4,
    };
    let mut cands = vec![
        t(8, 64, 16),
        t(4, 64, 16),
        t(4, 32, 16),
        t(2, 32, 16),
        t(2, 32, 8),
        t(1, 16, 8),
    ];
    // Rows split over 4 threads or fewer (head_dim 16, 48, 80, ...): each thread would hold
    // cols / 4 columns. H200, training's model (head_dim 48, G 4, blocks of 16, 2048 tokens,
    // batch 16; `bench/train-tiles-sweep.sh`, docs/BENCHMARKS.md): the selection 3.67 ms with
    // 8,64,16 and 0.57 ms with 2,16,16.
    if Tiles::tc(d) <= 4 {
        cands.insert(0, t(2, 16, 16));
    }
    let forced = tiles_override("score");
    if let Some(o) = forced {
        cands.insert(0, o);
    }
    let fits = |c: &Tiles| {
        c.rows() >= g
            && d.is_multiple_of(c.dc)
            && c.cols >= Tiles::tc(d)
            && c.shared_bytes(Kind::Fwd, d) <= max_shared
    };
    let first = cands.iter().copied().find(fits)?;
    // With `rows` (a decoding step's few tokens): the smallest tile that still holds them all.
    match rows {
        Some(r) if first.rows() > r && Some(first) != forced => cands
            .iter()
            .copied()
            .filter(|c| fits(c) && c.rows() >= r)
            .min_by_key(|c| c.rows())
            .or(Some(first)),
        _ => Some(first),
    }
}
