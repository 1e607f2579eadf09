// Block selection's top-k with subgroup reductions (needs SUBGROUP; the host falls back to
// block_topk's bitonic sort without it). Same contract as block_topk (block_select.wgsl): forced
// blocks first, then the best scores, ties to the lower index, written ascending and padded with
// SENTINEL. Instead of sorting every candidate (log²(blocks)/2 barrier-separated phases) it runs
// min(k, candidates) rounds of a workgroup-wide arg-max: each thread keeps the best of its own
// candidates, subgroupMax / subgroupMin reduce them within each subgroup, and every thread
// combines the subgroups' winners from workgroup memory (one barrier per round: the winners
// alternate between two halves). Only the winner's owner rescans its candidates.
// Constants: those of block_select.wgsl (NT, NBP, BLK; D and BQ for attn_params.wgsl).
//#include "attn_params.wgsl"
//#include "select_common.wgsl"

// Below every score, NEG and PAD: a block already taken.
const TAKEN: f32 = -3.4028235e38;
// Candidates per thread: thread tid holds blocks tid + n·NT.
const EPT: u32 = (NBP + NT - 1u) / NT;
// With NOSA the rounds run in two stages: query-aware, then by the eviction score.

// Each subgroup's winner of a round, in two halves used alternately.
var<workgroup> win_key: array<f32, 2u * NT>;
var<workgroup> win_idx: array<u32, 2u * NT>;

struct Best {
    key: f32,
    idx: u32,
}

fn local_best(keys: ptr<function, array<f32, EPT>>, tid: u32) -> Best {
    var b = Best((*keys)[0], tid);
    for (var n = 1u; n < EPT; n++) {
        let j = tid + n * NT;
        if (precedes((*keys)[n], j, b.key, b.idx)) {
            b = Best((*keys)[n], j);
        }
    }
    return b;
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
    let t = row % prm.seq_q;
    let g = unit_of(row / prm.seq_q);
    let cur = current_block(g, t);
    let end = candidate_end(g, cur);
    let srow = prm.s_off + row * prm.np;
    let pend = pooled_end(g, t);
    var keys: array<f32, EPT>;
    for (var n = 0u; n < EPT; n++) {
        let x = topk_key(g, srow, tid + n * NT, end, cur, pend);
        // A NaN score ranks with the non-candidates (comparisons with NaN never pick it).
        keys[n] = select(x, NEG, x != x);
    }
    var b = local_best(&keys, tid);
    let n_out = min(prm.k, end);
    var n_stage = n_out;
//#if NOSA
    n_stage = min(prm.k - prm.evict, end);
//#endif
    for (var s = 0u; s < n_out; s++) {
//#if NOSA
        if (s == n_stage) {
            // The query-aware blocks are taken; the rest rank by the eviction score.
            let u = row / prm.seq_q;
            for (var n = 0u; n < EPT; n++) {
                let j = tid + n * NT;
                if (keys[n] != TAKEN) {
                    keys[n] = select(evict_score(g, u, j, pend), PAD, j >= end);
                }
            }
            b = local_best(&keys, tid);
        }
//#endif
        let m = subgroupMax(b.key);
        let i = subgroupMin(select(SENTINEL, b.idx, b.key == m));
        let h = (s & 1u) * NT;
        if (lane == 0u) {
            win_key[h + sg] = m;
            win_idx[h + sg] = i;
        }
        workgroupBarrier();
        var w = Best(win_key[h], win_idx[h]);
        for (var g = 1u; g < nsg; g++) {
            if (precedes(win_key[h + g], win_idx[h + g], w.key, w.idx)) {
                w = Best(win_key[h + g], win_idx[h + g]);
            }
        }
        if (tid == 0u) {
            sh_idx[s] = w.idx;
        }
        // w.idx < end <= NBP: the owner's slot exists.
        if (w.idx < end && w.idx % NT == tid) {
            keys[w.idx / NT] = TAKEN;
            b = local_best(&keys, tid);
        }
    }
    workgroupBarrier();
    write_ascending(n_out, row, tid);
}
