// Block selection's top-k with subgroup reductions (needs SUBGROUP; the host falls back to
// block_topk's bitonic sort without it). Same contract as block_topk (block_select.wgsl): forced
// blocks first, then the best scores, ties to the lower index, written ascending and padded with
// SENTINEL. Instead of sorting every candidate (log²(blocks)/2 barrier-separated phases) it runs
// min(k, candidates) rounds of an arg-max: a row's blocks are dealt to SLOTS slots (slot s holds
// blocks s + n·SLOTS), each slot keeps the best of its own, subgroupMax / subgroupMin reduce
// them, and only the winner's owner changes: it moves its runner-up up, and scans its blocks
// again only when it has none (`Lead`). Two entries:
//   block_topk_sg   a workgroup per row, SLOTS = NT threads; every thread combines the
//                   subgroups' winners from workgroup memory (one barrier per round: the
//                   winners alternate between two halves)
//   block_topk_row  a subgroup per row, SLOTS = the adapter's one subgroup size (checked on
//                   the host), NT / SLOTS rows per workgroup, no workgroup barrier; lane l keeps
//                   the l-th winner (k <= SLOTS). H200, 16384 tokens, 1024 blocks, k 16:
//                   0.92 ms against 1.17 (docs/BENCHMARKS.md)
// Constants: those of block_select.wgsl (NT, NBP, BLK; D and BQ for attn_params.wgsl), SLOTS,
// EPT = ceil(NBP / SLOTS), a slot's blocks. The loops over a slot's blocks are unrolled
// (`//#for`) so its keys stay in registers: with loops the H200's driver kept them in local
// memory (128 bytes), and the row form took 0.91 ms against 0.77 unrolled (16384 tokens, 1024
// blocks, k 16; docs/BENCHMARKS.md).
//#include "attn_params.wgsl"
//#include "select_common.wgsl"

// Below every score, NEG and PAD: a block already taken.
const TAKEN: f32 = -3.4028235e38;
// With NOSA the rounds run in two stages: query-aware, then by the eviction score.

// Each subgroup's winner of a round, in two halves used alternately (block_topk_sg).
var<workgroup> win_key: array<f32, 2u * NT>;
var<workgroup> win_idx: array<u32, 2u * NT>;

struct Best {
    key: f32,
    idx: u32,
}

// What a row's rounds need: its unit, candidates and how many blocks it takes in each stage.
struct Row {
    g: Unit,
    u: u32,
    end: u32,
    pend: u32,
    n_out: u32,
    n_stage: u32,
}

// Row `row`'s candidates, slot `slot`'s sort keys loaded into `keys`.
fn load_row(row: u32, slot: u32, keys: ptr<function, array<f32, EPT>>) -> Row {
    let t = row % prm.seq_q;
    let u = row / prm.seq_q;
    let g = unit_of(u);
    let cur = current_block(g, t);
    let end = candidate_end(g, cur);
    let srow = prm.s_off + row * prm.np;
    let pend = pooled_end(g, t);
    // A NaN score ranks with the non-candidates (comparisons with NaN never pick it).
//#for N in 0..EPT
    {
        let x = topk_key(g, srow, slot + {N} * SLOTS, end, cur, pend);
        (*keys)[{N}] = select(x, NEG, x != x);
    }
//#endfor
    let n_out = min(prm.k, end);
    var n_stage = n_out;
//#if NOSA
    n_stage = min(prm.k - prm.evict, end);
//#endif
    return Row(g, u, end, pend, n_out, n_stage);
}

// A slot's best key and its runner-up, in the order of `precedes`: a slot whose best is taken
// moves the runner-up up instead of scanning its blocks again. The runner-up's key TAKEN means
// unknown (just moved up, or no block left): the slot's next take scans.
struct Lead {
    best: Best,
    next: Best,
}

fn local_lead(keys: ptr<function, array<f32, EPT>>, slot: u32) -> Lead {
    // Every block precedes (TAKEN, SENTINEL), taken ones included: `best` is a real block.
    var b = Best(TAKEN, SENTINEL);
    var n = b;
//#for N in 0..EPT
    {
        let c = Best((*keys)[{N}], slot + {N} * SLOTS);
        if (precedes(c.key, c.idx, b.key, b.idx)) {
            n = b;
            b = c;
        } else if (precedes(c.key, c.idx, n.key, n.idx)) {
            n = c;
        }
    }
//#endfor
    return Lead(b, n);
}

// Round s's start: with NOSA, past the query-aware blocks the rest rank by the eviction score.
fn stage_keys(r: Row, s: u32, slot: u32, keys: ptr<function, array<f32, EPT>>, b: ptr<function, Lead>) {
//#if NOSA
    if (s == r.n_stage) {
//#for N in 0..EPT
        if ((*keys)[{N}] != TAKEN) {
            let j = slot + {N} * SLOTS;
            (*keys)[{N}] = select(evict_score(r.g, r.u, j, r.pend), PAD, j >= r.end);
        }
//#endfor
        *b = local_lead(keys, slot);
    }
//#endif
}

// Block i won the round: its owner marks it taken and moves its runner-up up, or scans for
// its next two. By constant indices: a computed index put `keys` in local memory (1.8 ms slower
// on the H200). The runner-up saves most scans: H200, 16384 tokens, 1024 blocks, k 16, 0.77 ->
// 0.60 ms (docs/BENCHMARKS.md).
fn take(i: u32, slot: u32, keys: ptr<function, array<f32, EPT>>, b: ptr<function, Lead>) {
    if (i % SLOTS == slot) {
//#for N in 0..EPT
        if (slot + {N} * SLOTS == i) {
            (*keys)[{N}] = TAKEN;
        }
//#endfor
        if ((*b).next.key != TAKEN) {
            (*b).best = (*b).next;
            (*b).next = Best(TAKEN, SENTINEL);
        } else {
            *b = local_lead(keys, slot);
        }
    }
}

@compute @workgroup_size(NT)
fn block_topk_sg(@builtin(workgroup_id) wg: vec3<u32>,
                 @builtin(local_invocation_index) tid: u32,
                 @builtin(subgroup_id) sg: u32,
                 @builtin(num_subgroups) nsg: u32,
                 @builtin(subgroup_invocation_id) lane: u32) {
    let row = wg.y * prm.grid_x + wg.x;
    if (row >= prm.units * prm.seq_q) {
        return;
    }
    var keys: array<f32, EPT>;
    let r = load_row(row, tid, &keys);
    var b = local_lead(&keys, tid);
    for (var s = 0u; s < r.n_out; s++) {
        stage_keys(r, s, tid, &keys, &b);
        let m = subgroupMax(b.best.key);
        let i = subgroupMin(select(SENTINEL, b.best.idx, b.best.key == m));
        let h = (s & 1u) * NT;
        if (lane == 0u) {
            win_key[h + sg] = m;
            win_idx[h + sg] = i;
        }
        workgroupBarrier();
        var w = Best(win_key[h], win_idx[h]);
        for (var x = 1u; x < nsg; x++) {
            if (precedes(win_key[h + x], win_idx[h + x], w.key, w.idx)) {
                w = Best(win_key[h + x], win_idx[h + x]);
            }
        }
        if (tid == 0u) {
            sh_idx[s] = w.idx;
        }
        // w.idx < end <= NBP: the owner's slot exists.
        take(w.idx, tid, &keys, &b);
    }
    workgroupBarrier();
    write_ascending(r.n_out, row, tid);
}

@compute @workgroup_size(NT)
fn block_topk_row(@builtin(workgroup_id) wg: vec3<u32>,
                  @builtin(subgroup_id) sg: u32,
                  @builtin(subgroup_invocation_id) lane: u32) {
    // Rows past the launch's run the rounds on a copy of row 0 and write nothing: no subgroup
    // operation sits behind a branch that differs between the subgroups.
    let row_in = (wg.y * prm.grid_x + wg.x) * (NT / SLOTS) + sg;
    let live = row_in < prm.units * prm.seq_q;
    let row = select(0u, row_in, live);
    var keys: array<f32, EPT>;
    let r = load_row(row, lane, &keys);
    var b = local_lead(&keys, lane);
    var mine = SENTINEL;
    for (var s = 0u; s < r.n_out; s++) {
        stage_keys(r, s, lane, &keys, &b);
        let m = subgroupMax(b.best.key);
        let i = subgroupMin(select(SENTINEL, b.best.idx, b.best.key == m));
        if (lane == s) {
            mine = i;
        }
        take(i, lane, &keys, &b);
    }
    // Ascending: each winner's rank among the n_out.
    var rank = 0u;
    for (var x = 0u; x < r.n_out; x++) {
        rank += select(0u, 1u, subgroupShuffle(mine, x) < mine);
    }
    if (live) {
        let out = prm.i_off + row * prm.k;
        if (lane < r.n_out) {
            sel[out + rank] = mine;
        } else if (lane < prm.k) {
            sel[out + lane] = SENTINEL;
        }
    }
}
