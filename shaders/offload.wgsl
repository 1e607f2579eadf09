// NOSA's offloaded KV cache (NOSA.md §4; src/decode/offload.rs): the whole cache lives in host
// memory; per (sequence, kv head) NSLOT slots of BLK rows on the GPU: NSLOT - 1 hold complete
// selected blocks, the last (the tail) the block being filled. A block map says which block
// each slot holds (SENTINEL: empty); for the tail, its age entry counts the rows it holds.
//   diff:   per unit, after the selection: slots whose block is still selected keep it; each
//           selected complete block not on the GPU takes a freed slot, the least recently
//           used first (empty slots before any, then the most steps since their block was
//           last selected, then the lowest index: a bitonic sort), so that slots beyond the
//           selection keep recent blocks; a reverse map (block -> the slot it was last given)
//           finds a selected block's slot without scanning them; the block being filled is read from the tail, which takes only the
//           rows it lacks (one a step: the new token; the whole block's rows so far when a
//           new block starts or after a prompt); out come the (block, slot) pairs the
//           attention reads, the load list, the tail's rows to copy, and counters (selected,
//           found on the GPU, blocks loaded, tail rows copied)       (workgroup per unit)
//   gather: the blocks of the load list and the tail's rows, host store -> slots (k, v, bias)
//                                          (workgroup per (unit, load-list entry or tail))
// Constants: D, NT, BLK, NSLOT (slots per unit), NSP (a power of two >= NSLOT - 1, at least 2),
// KSEL (selection entries per unit), HAS_BIAS.

const D4: u32 = D / 4u;
const SENTINEL: u32 = 0xffffffffu;
// Slots for complete blocks, then the tail.
const NREG: u32 = NSLOT - 1u;
const TAIL: u32 = NSLOT - 1u;

struct OffloadParams {
    cap: u32,       // host rows per unit
    heads_kv: u32,
    units: u32,
    grid_x: u32,
}

@group(0) @binding(0) var<uniform> prm: OffloadParams;
@group(0) @binding(1) var<storage, read> sel: array<u32>;
@group(0) @binding(2) var<storage, read> lens: array<u32>;
@group(0) @binding(3) var<storage, read_write> map: array<u32>;
@group(0) @binding(4) var<storage, read_write> pairs: array<vec2<u32>>;
@group(0) @binding(5) var<storage, read_write> loads: array<vec2<u32>>;
@group(0) @binding(6) var<storage, read_write> counts: array<u32>;
@group(0) @binding(7) var<storage, read_write> stats: array<atomic<u32>>;
// Steps since each slot's block was last selected (saturating).
@group(0) @binding(14) var<storage, read_write> ages: array<u32>;
// Per unit, the host rows [x, y) of the unit's store the tail takes this step.
@group(0) @binding(15) var<storage, read_write> tails: array<vec2<u32>>;
// Per (unit, block of the store): the slot the block was last given (trusted only where the
// map agrees).
@group(0) @binding(16) var<storage, read_write> rev: array<u32>;

@group(0) @binding(8) var<storage, read> host_k: array<ST>;
@group(0) @binding(9) var<storage, read> host_v: array<ST>;
@group(0) @binding(10) var<storage, read_write> slot_k: array<ST>;
@group(0) @binding(11) var<storage, read_write> slot_v: array<ST>;
//#if HAS_BIAS
@group(0) @binding(12) var<storage, read> host_b: array<f32>;
@group(0) @binding(13) var<storage, read_write> slot_b: array<f32>;
//#endif

var<workgroup> sh_sel: array<u32, KSEL>;
var<workgroup> sh_slot: array<u32, KSEL>;
var<workgroup> sh_map: array<u32, NSLOT>;
// KEPT for a slot whose block stays (or, after the hand-out, was loaded), else its age for
// the LRU order; then sh_order[r] = the slot of rank r in that order (kept slots last).
var<workgroup> sh_keep: array<u32, NSP>;
var<workgroup> sh_order: array<u32, NSP>;
const KEPT: u32 = 0xffffffffu;
// The age of an empty or partial slot: older than any block.
const OLDEST: u32 = 0xfffffffeu;

//#include "bitonic.wgsl"

// The LRU order's compare-exchange: slot b goes before slot a when b is freed and a kept, or b
// is older, or as old with a lower index.
fn bitonic_step(lo: u32, hi: u32, up: bool) {
    let sa = sh_order[lo];
    let sb = sh_order[hi];
    let ka = sh_keep[sa];
    let kb = sh_keep[sb];
    let b_first = kb != KEPT && (ka == KEPT || kb > ka || (kb == ka && sb < sa));
    if (up == b_first) {
        sh_order[lo] = sb;
        sh_order[hi] = sa;
    }
}

@compute @workgroup_size(NT)
fn diff(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let u = wg.y * prm.grid_x + wg.x;
    if (u >= prm.units) {
        return;
    }
    let len = min(lens[u / prm.heads_kv], prm.cap);
    // The block the newest token is filling: it is read from the tail.
    let cur = select(SENTINEL, (len - 1u) / BLK, len > 0u);
    let nb = (len + BLK - 1u) / BLK;
    for (var j = tid; j < KSEL; j += NT) {
        let b = sel[u * KSEL + j];
        // Blocks past the cache select nothing (kept out of the slots).
        sh_sel[j] = select(SENTINEL, b, b < nb);
        sh_slot[j] = select(SENTINEL, TAIL, b == cur && b < nb);
    }
    for (var s = tid; s < NSP; s += NT) {
        var age = KEPT;
        if (s < NREG) {
            let b = map[u * NSLOT + s];
            sh_map[s] = b;
            // Empty slots (and any block not complete now) are the oldest.
            age = select(OLDEST, min(ages[u * NSLOT + s], OLDEST - 1u), b < nb && b != cur);
        }
        sh_keep[s] = age;
        sh_order[s] = s;
    }
    workgroupBarrier();
    // A slot keeps its block when the block is selected.
    let nblk = prm.cap / BLK;
    for (var j = tid; j < KSEL; j += NT) {
        let b = sh_sel[j];
        if (b < nb && b != cur) {
            let s = rev[u * nblk + b];
            if (s < NREG && sh_map[s] == b) {
                sh_slot[j] = s;
                sh_keep[s] = KEPT;
            }
        }
    }
    workgroupBarrier();
    // Sort the slots, least recently used first (ties: lowest index), kept ones last.
    bitonic(NSP, tid);
    // One invocation hands out the freed slots in that order (KSEL steps, deterministic).
    if (tid == 0u) {
        let tail_b = map[u * NSLOT + TAIL];
        var free = 0u;
        var n = 0u;
        var selected = 0u;
        var hits = 0u;
        for (var j = 0u; j < KSEL; j++) {
            let b = sh_sel[j];
            if (b == SENTINEL) {
                continue;
            }
            selected += 1u;
            if (b == cur) {
                hits += u32(tail_b == cur);
                continue;
            }
            if (sh_slot[j] != SENTINEL) {
                hits += 1u;
                continue;
            }
            // The current block is always selected (the host checks NSLOT >= KSEL), so a
            // freed slot is left; a selection without it leaves the rest unread, not wrong.
            if (free >= NREG || sh_keep[sh_order[free]] == KEPT) {
                continue;
            }
            let s = sh_order[free];
            free += 1u;
            sh_keep[s] = KEPT;
            sh_slot[j] = s;
            sh_map[s] = b;
            rev[u * nblk + b] = s;
            loads[u * KSEL + n] = vec2<u32>(b, s);
            n += 1u;
        }
        counts[u] = n;
        // The tail's rows: those it lacks of the current block.
        var first = len;
        if (len > 0u) {
            let base = cur * BLK;
            first = base;
            if (tail_b == cur) {
                first = base + min(ages[u * NSLOT + TAIL], len - base);
            }
            map[u * NSLOT + TAIL] = cur;
            ages[u * NSLOT + TAIL] = len - base;
        }
        tails[u] = vec2<u32>(first, len);
        atomicAdd(&stats[0], selected);
        atomicAdd(&stats[1], hits);
        atomicAdd(&stats[2], n);
        atomicAdd(&stats[3], len - first);
    }
    workgroupBarrier();
    for (var j = tid; j < KSEL; j += NT) {
        pairs[u * KSEL + j] = vec2<u32>(sh_sel[j], sh_slot[j]);
    }
    for (var s = tid; s < NREG; s += NT) {
        map[u * NSLOT + s] = sh_map[s];
        // A slot whose block was selected this step is 0 steps old; the others one step older.
        let a = ages[u * NSLOT + s];
        ages[u * NSLOT + s] = select(select(a + 1u, a, a >= OLDEST - 1u), 0u, sh_keep[s] == KEPT);
    }
}

@compute @workgroup_size(NT)
fn gather(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let id = wg.y * prm.grid_x + wg.x;
    let u = id / (KSEL + 1u);
    let r = id % (KSEL + 1u);
    if (u >= prm.units) {
        return;
    }
    if (r == KSEL) {
        // The tail's rows, all of one block (a corrupt range is not read).
        let t = tails[u];
        if (t.x >= t.y || t.y > prm.cap || t.x / BLK != (t.y - 1u) / BLK) {
            return;
        }
        let n = (t.y - t.x) * D4;
        let src = (u * prm.cap + t.x) * D4;
        let dst = ((u * NSLOT + TAIL) * BLK + t.x % BLK) * D4;
        for (var e = tid; e < n; e += NT) {
            slot_k[dst + e] = host_k[src + e];
            slot_v[dst + e] = host_v[src + e];
        }
//#if HAS_BIAS
        for (var e = tid; e < t.y - t.x; e += NT) {
            slot_b[(u * NSLOT + TAIL) * BLK + t.x % BLK + e] = host_b[u * prm.cap + t.x + e];
        }
//#endif
        return;
    }
    if (r >= counts[u]) {
        return;
    }
    let ld = loads[u * KSEL + r];
    // Rows past the capacity (a corrupt entry) are not read.
    if (ld.x >= prm.cap / BLK || ld.y >= NREG) {
        return;
    }
    let src = (u * prm.cap + ld.x * BLK) * D4;
    let dst = (u * NSLOT + ld.y) * BLK * D4;
    for (var e = tid; e < BLK * D4; e += NT) {
        slot_k[dst + e] = host_k[src + e];
        slot_v[dst + e] = host_v[src + e];
    }
//#if HAS_BIAS
    for (var e = tid; e < BLK; e += NT) {
        slot_b[(u * NSLOT + ld.y) * BLK + e] = host_b[u * prm.cap + ld.x * BLK + e];
    }
//#endif
}
