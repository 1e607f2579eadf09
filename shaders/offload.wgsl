// NOSA's offloaded KV cache (NOSA.md §4; src/decode/offload.rs): the whole cache lives in host
// memory; per (sequence, kv head) NSLOT slots of BLK rows on the GPU hold selected blocks, and a
// block map says which (SENTINEL: empty; PARTIAL | block: a copy of a block that was still
// filling, never reused).
//   diff:   per unit, after the selection: slots whose block is still selected keep it; each
//           selected block not on the GPU (and the current, growing block, always) takes a
//           freed slot, the least recently used first (empty and partial slots before any,
//           then the most steps since their block was last selected, then the lowest index),
//           so that slots beyond the selection keep recent blocks; out come the (block, slot)
//           pairs the attention reads, the load list, and counters (selected, found on the GPU,
//           loaded)                                                    (workgroup per unit)
//   gather: the blocks of the load list, host store -> slots (k, v, bias)
//                                                   (workgroup per (unit, load-list entry))
// Constants: D, NT, BLK, NSLOT (slots per unit), KSEL (selection entries per unit), HAS_BIAS.

const D4: u32 = D / 4u;
const SENTINEL: u32 = 0xffffffffu;
const PARTIAL: u32 = 0x80000000u;

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
// the LRU order; then sh_order[r] = the free slot of rank r in that order.
var<workgroup> sh_keep: array<u32, NSLOT>;
var<workgroup> sh_order: array<u32, NSLOT>;
const KEPT: u32 = 0xffffffffu;
// The age of an empty or partial slot: older than any block.
const OLDEST: u32 = 0xfffffffeu;

@compute @workgroup_size(NT)
fn diff(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let u = wg.y * prm.grid_x + wg.x;
    if (u >= prm.units) {
        return;
    }
    let len = min(lens[u / prm.heads_kv], prm.cap);
    // The block the newest token is filling: its rows change every step, so it is loaded again.
    let cur = select(SENTINEL, (len - 1u) / BLK, len > 0u);
    let nb = (len + BLK - 1u) / BLK;
    for (var j = tid; j < KSEL; j += NT) {
        let b = sel[u * KSEL + j];
        // Blocks past the cache select nothing (kept out of the slots).
        sh_sel[j] = select(SENTINEL, b, b < nb);
        sh_slot[j] = SENTINEL;
    }
    for (var s = tid; s < NSLOT; s += NT) {
        sh_map[s] = map[u * NSLOT + s];
    }
    workgroupBarrier();
    // A slot keeps its block when the block is selected (and complete).
    for (var s = tid; s < NSLOT; s += NT) {
        let b = sh_map[s];
        var keep = false;
        let whole = b != SENTINEL && b != cur && (b & PARTIAL) == 0u;
        if (whole) {
            for (var j = 0u; j < KSEL; j++) {
                if (sh_sel[j] == b) {
                    keep = true;
                    sh_slot[j] = s;
                }
            }
        }
        sh_keep[s] = select(select(OLDEST, min(ages[u * NSLOT + s], OLDEST - 1u), whole), KEPT, keep);
    }
    workgroupBarrier();
    // Rank the freed slots, least recently used first (ties: lowest index).
    for (var s = tid; s < NSLOT; s += NT) {
        let a = sh_keep[s];
        if (a != KEPT) {
            var r = 0u;
            for (var t = 0u; t < NSLOT; t++) {
                let b = sh_keep[t];
                r += u32(b != KEPT && (b > a || (b == a && t < s)));
            }
            sh_order[r] = s;
        }
    }
    workgroupBarrier();
    // One invocation hands out the freed slots in that order (KSEL steps, deterministic).
    if (tid == 0u) {
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
            if (sh_slot[j] != SENTINEL) {
                hits += 1u;
                continue;
            }
            // NSLOT >= KSEL (the host checks), so a freed slot is always left.
            let s = sh_order[free];
            free += 1u;
            sh_keep[s] = KEPT;
            sh_slot[j] = s;
            sh_map[s] = select(b, b | PARTIAL, b == cur);
            loads[u * KSEL + n] = vec2<u32>(b, s);
            n += 1u;
        }
        counts[u] = n;
        atomicAdd(&stats[0], selected);
        atomicAdd(&stats[1], hits);
        atomicAdd(&stats[2], n);
    }
    workgroupBarrier();
    for (var j = tid; j < KSEL; j += NT) {
        pairs[u * KSEL + j] = vec2<u32>(sh_sel[j], sh_slot[j]);
    }
    for (var s = tid; s < NSLOT; s += NT) {
        map[u * NSLOT + s] = sh_map[s];
        // A slot whose block was selected this step is 0 steps old; the others one step older.
        let a = ages[u * NSLOT + s];
        ages[u * NSLOT + s] = select(select(a + 1u, a, a >= OLDEST - 1u), 0u, sh_keep[s] == KEPT);
    }
}

@compute @workgroup_size(NT)
fn gather(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let id = wg.y * prm.grid_x + wg.x;
    let u = id / KSEL;
    let r = id % KSEL;
    if (u >= prm.units || r >= counts[u]) {
        return;
    }
    let ld = loads[u * KSEL + r];
    // Rows past the capacity (a corrupt entry) are not read.
    if (ld.x >= prm.cap / BLK || ld.y >= NSLOT) {
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
