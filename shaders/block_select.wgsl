// Block selection (PAPERS.md §1; reference: src/reference/select.rs). Three entries:
//   block_keys:   k̄_p = mean of the keys of pooling window p: the blocks (SSA, MoBA) or
//                 InfLLM-V2's 32-token kernels at stride 16             (thread per vec4 element)
//   block_scores: score_p = Σ_{h in group} softmax_p(s·q_h·k̄_p) (SSA, InfLLM-V2) or
//                 Σ_h s·q_h·k̄_p (MoBA) over the candidate windows; others get NEG
//                                                                         (thread per token)
//   block_topk:   block scores (InfLLM-V2: max over the candidate kernels overlapping the block),
//                 forced blocks, then the best scores (ties to the lower index), k in all,
//                 written ascending and padded with SENTINEL         (workgroup per token row)
// Constants from the launcher: D, BLK (block size), NBP (power of two >= blocks), NT (threads).

const D4: u32 = D / 4u;
const NEG: f32 = -3.0e38;      // not a candidate
const PAD: f32 = -3.4e38;      // past the last block (sorts after NEG)
const FORCED: f32 = 3.0e38;    // forced blocks sort first
const SENTINEL: u32 = 0xffffffffu;
const LOG2E: f32 = 1.4426950408889634;

struct SelParams {
    seq_q: u32,
    seq_k: u32,
    q_pos0: u32,
    causal: u32,
    group: u32,
    nb: u32,
    k: u32,
    n_init: u32,
    n_local: u32,
    mode: u32,    // 0 SSA, 1 MoBA, 2 InfLLM-V2
    scale: f32,
    grid_x: u32,
    q_off: u32,   // element offsets inside the bindings (multiples of 4)
    k_off: u32,
    kb_off: u32,
    s_off: u32,
    i_off: u32,
    units: u32,   // (batch, kv-head) groups in this launch
    np: u32,      // pooled keys (= nb except for InfLLM-V2)
    pool_w: u32,  // pooling window and stride in tokens
    pool_s: u32,
    _p0: u32,
    _p1: u32,
    _p2: u32,
}

@group(0) @binding(0) var<uniform> prm: SelParams;
@group(0) @binding(1) var<storage, read> q: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> k: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> kbar: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> scores: array<f32>;
@group(0) @binding(5) var<storage, read_write> sel: array<u32>;

var<workgroup> sh_key: array<f32, NBP>;
var<workgroup> sh_idx: array<u32, NBP>;

fn current_block(t: u32) -> u32 {
    return min((prm.q_pos0 + t) / BLK, prm.nb - 1u);
}

fn candidate_end(cur: u32) -> u32 {
    return select(prm.nb, cur + 1u, prm.causal != 0u);
}

fn is_forced(cur: u32, j: u32) -> bool {
    return j == cur || j < prm.n_init || (j < cur && cur - j <= prm.n_local);
}

// Candidate pooled keys of token t: those starting at or before it (causal).
fn pooled_end(t: u32) -> u32 {
    return select(prm.np, min(prm.np, (prm.q_pos0 + t) / prm.pool_s + 1u), prm.causal != 0u);
}

@compute @workgroup_size(NT)
fn block_keys(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let e = (wg.y * prm.grid_x + wg.x) * NT + tid;
    if (e >= prm.units * prm.np * D4) {
        return;
    }
    let u = e / (prm.np * D4);
    let p = (e / D4) % prm.np;
    let c = e % D4;
    let t0 = p * prm.pool_s;
    let t1 = min(t0 + prm.pool_w, prm.seq_k);
    var acc = vec4<f32>(0.0);
    for (var t = t0; t < t1; t++) {
        acc += k[prm.k_off / 4u + (u * prm.seq_k + t) * D4 + c];
    }
    kbar[prm.kb_off / 4u + (u * prm.np + p) * D4 + c] = acc / f32(t1 - t0);
}

fn logit(qv: ptr<function, array<vec4<f32>, D4>>, kb: u32) -> f32 {
    var acc = 0.0;
    for (var c = 0u; c < D4; c++) {
        let b = kbar[kb + c];
        let a = (*qv)[c];
        acc = fma(a.w, b.w, fma(a.z, b.z, fma(a.y, b.y, fma(a.x, b.x, acc))));
    }
    return acc * prm.scale;
}

@compute @workgroup_size(NT)
fn block_scores(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let t = wg.x * NT + tid;
    let u = wg.y;
    if (t >= prm.seq_q) {
        return;
    }
    let end = pooled_end(t);
    let srow = prm.s_off + (u * prm.seq_q + t) * prm.np;
    let kb0 = prm.kb_off / 4u + u * prm.np * D4;
    for (var j = 0u; j < prm.np; j++) {
        scores[srow + j] = select(NEG, 0.0, j < end);
    }
    let moba = prm.mode == 1u;
    var qv: array<vec4<f32>, D4>;
    for (var h = 0u; h < prm.group; h++) {
        let q0 = prm.q_off / 4u + ((u * prm.group + h) * prm.seq_q + t) * D4;
        for (var c = 0u; c < D4; c++) {
            qv[c] = q[q0 + c];
        }
        var lse2 = 0.0;
        if (!moba) {
            // Online log-sum-exp (log2 domain) over the candidates.
            var m = NEG;
            var l = 0.0;
            for (var j = 0u; j < end; j++) {
                let x = logit(&qv, kb0 + j * D4) * LOG2E;
                if (x > m) {
                    l = l * exp2(m - x) + 1.0;
                    m = x;
                } else {
                    l += exp2(x - m);
                }
            }
            lse2 = m + log2(l);
        }
        for (var j = 0u; j < end; j++) {
            let x = logit(&qv, kb0 + j * D4);
            scores[srow + j] += select(exp2(x * LOG2E - lse2), x, moba);
        }
    }
}

// Score of block j: its pooled score, or (InfLLM-V2) the max over the candidate kernels that
// overlap it. `pend` = candidate pooled keys of the row.
fn block_score(srow: u32, j: u32, pend: u32) -> f32 {
    if (prm.mode != 2u) {
        return scores[srow + j];
    }
    let start = j * BLK;
    var lo = 0u;
    if (start >= prm.pool_w) {
        lo = (start - prm.pool_w) / prm.pool_s + 1u;
    }
    let hi = min(min((start + BLK + prm.pool_s - 1u) / prm.pool_s, prm.np), pend);
    var best = NEG;
    for (var m = lo; m < hi; m++) {
        best = max(best, scores[srow + m]);
    }
    return best;
}

// Does (ka, ia) come before (kb, ib)? Higher key first, then the lower index.
fn precedes(ka: f32, ia: u32, kb: f32, ib: u32) -> bool {
    return ka > kb || (ka == kb && ia < ib);
}

@compute @workgroup_size(NT)
fn block_topk(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let row = wg.y * prm.grid_x + wg.x;
    if (row >= prm.units * prm.seq_q) {
        return;
    }
    let t = row % prm.seq_q;
    let cur = current_block(t);
    let end = candidate_end(cur);
    // Sort only the smallest power of two that holds the candidates.
    var p2 = 2u;
    while (p2 < end) {
        p2 <<= 1u;
    }
    let srow = prm.s_off + row * prm.np;
    let pend = pooled_end(t);
    for (var j = tid; j < p2; j += NT) {
        var key = PAD;
        if (j < end) {
            key = select(block_score(srow, j, pend), FORCED, is_forced(cur, j));
        }
        sh_key[j] = key;
        sh_idx[j] = j;
    }
    workgroupBarrier();
    // Bitonic sort of (key, index) by `precedes`.
    for (var size = 2u; size <= p2; size <<= 1u) {
        for (var stride = size / 2u; stride > 0u; stride >>= 1u) {
            for (var i = tid; i < p2 / 2u; i += NT) {
                let lo = 2u * stride * (i / stride) + i % stride;
                let hi = lo + stride;
                let ka = sh_key[lo];
                let ia = sh_idx[lo];
                let kb = sh_key[hi];
                let ib = sh_idx[hi];
                let first = (lo & size) == 0u;
                if (first == precedes(kb, ib, ka, ia)) {
                    sh_key[lo] = kb;
                    sh_idx[lo] = ib;
                    sh_key[hi] = ka;
                    sh_idx[hi] = ia;
                }
            }
            workgroupBarrier();
        }
    }
    // The first min(k, candidates) entries are the selection; write them in ascending order.
    let n = min(prm.k, end);
    let out = prm.i_off + row * prm.k;
    for (var s = tid; s < prm.k; s += NT) {
        if (s < n) {
            let idx = sh_idx[s];
            var rank = 0u;
            for (var r = 0u; r < n; r++) {
                rank += select(0u, 1u, sh_idx[r] < idx);
            }
            sel[out + rank] = idx;
        } else {
            sel[out + s] = SENTINEL;
        }
    }
}
