// Decoding attention (flash-decoding; reference: src/reference/decode.rs): n_q new query tokens
// per sequence against its KV cache `[batch, heads_kv, CAP, D]`, sequence b holding lens[b]
// tokens, query i at position lens[b] - n_q + i (causal). The keys of one (sequence, kv head,
// query) are split into n_split ranges of at most SPK keys, one workgroup each, so that one
// sequence still fills the GPU; each writes its softmax-normalised partial O and partial LSE,
// and `combine` merges them by their LSE. With one range (DIRECT) the workgroup writes O and
// LSE itself. The G query heads of a kv head share the workgroup (GQA: each key is read once
// for all of them).
// A workgroup takes its range in two phases with a handful of barriers in all (not per tile):
// 1. thread per key: the key's row is read straight into registers (KCV vec4 at a time, all
//    loads issued before use) and its G logits go to workgroup memory; the rows' max and sum
//    come from tree reductions over the threads;
// 2. P V: thread per (output vec4 column, group of GT heads, key lane): V rows are read
//    coalesced (a warp reads whole rows), VU rows ahead, each once for GT heads; the LANES
//    key lanes are summed through workgroup memory at the end.
// SPARSE: the keys are those of the blocks a selection names (BLK tokens each, SENTINEL none),
// "virtual" key v = entry v / BLK, offset v % BLK. SLOTS (with SPARSE; NOSA's offloaded cache):
// k, v and the bias hold `stride` rows per unit, BLK per slot, and each selection entry is a
// (block, slot) pair: the block masks, the slot locates. HAS_BIAS: an additive per-key bias.
// Constants: D (head dim), G (query heads per kv head), NT (threads, a power of two), SPK (keys
// per range at most, >= D), KCV (vec4 of a K row per load round, a multiple of KL), KWIDE (K
// read as SW: 16-bit storage with D a multiple of 8 and k_off of 8), GT (heads per P V thread, a
// divisor of G), ITEMS (D / 4 * G / GT), LANES (max(NT / ITEMS, 1)), VU (V rows loaded ahead),
// SPARSE, SLOTS, BLK, HAS_BIAS, DIRECT. Lengths are clamped to the capacity and selections are
// checked against the length here, so no index leaves the buffers whatever the GPU-side
// inputs hold.

const NEG: f32 = -3.0e38;
const LN2: f32 = 0.6931471805599453;
const LOG2E: f32 = 1.4426950408889634;
const D4: u32 = D / 4u;
const SENTINEL: u32 = 0xffffffffu;

struct DecodeParams {
    n_q: u32,
    cap: u32,        // capacity of each sequence (lens are clamped to it)
    heads_kv: u32,
    u0: u32,         // first (sequence, kv head) unit of this launch (lens are per sequence)
    units: u32,      // units in this launch
    nsel: u32,       // SPARSE: entries per (unit, query)
    n_split: u32,    // key ranges per (unit, query)
    split_keys: u32, // virtual keys per range (a multiple of NT and of BLK)
    scale_log2: f32, // scale * log2(e)
    grid_x: u32,     // workgroups along x (flattened grids)
    q_off: u32,      // element offsets inside the bindings (multiples of 4)
    k_off: u32,
    i_off: u32,
    b_off: u32,
    p_off: u32,      // partial O (vec4) and partial LSE offsets
    l_off: u32,
    r_off: u32,      // LSE offset
    stride: u32,     // rows of k, v and the bias per unit (cap, or slots x BLK)
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> prm: DecodeParams;
@group(0) @binding(1) var<storage, read> q: array<ST>;
// K is read a row per thread (phase 1): with KWIDE, 16 bytes per load (SW) where ST is 8.
//#if KWIDE
alias KW = SW;
const KL: u32 = SWV;
fn k_part(w: KW, h: u32) -> vec4<f32> {
    return unpack_sw(w, h);
}
//#else
alias KW = ST;
const KL: u32 = 1u;
fn k_part(w: KW, h: u32) -> vec4<f32> {
    return unpack_st(w);
}
//#endif
@group(0) @binding(2) var<storage, read> k: array<KW>;
@group(0) @binding(3) var<storage, read> v: array<ST>;
@group(0) @binding(4) var<storage, read> lens: array<u32>;
@group(0) @binding(5) var<storage, read_write> o: array<ST>;
@group(0) @binding(6) var<storage, read_write> lse: array<f32>;
//#if SLOTS
@group(0) @binding(7) var<storage, read> sel: array<vec2<u32>>;
//#else
//#if SPARSE
@group(0) @binding(7) var<storage, read> sel: array<u32>;
//#endif
//#endif
//#if HAS_BIAS
@group(0) @binding(8) var<storage, read> bias: array<f32>;
//#endif
//#if DQ
// dQ: O's binding takes dQ, LSE is read, and dO and D = rowsum(dO ∘ O) come in.
@group(0) @binding(9) var<storage, read> d_o: array<ST>;
@group(0) @binding(10) var<storage, read> rowd: array<f32>;
var<workgroup> sh_do: array<vec4<f32>, G * D4>;
//#else
@group(0) @binding(9) var<storage, read_write> opart: array<vec4<f32>>;
@group(0) @binding(10) var<storage, read_write> lpart: array<f32>;
//#endif

var<workgroup> sh_q: array<vec4<f32>, G * D4>;
// Logits, then probabilities, of the range's keys (head g at g * SPK); at the end the key
// lanes' partial outputs (ITEMS * GT <= G * SPK / 4 vec4).
var<workgroup> sh_s: array<vec4<f32>, G * SPK / 4u>;
var<workgroup> sh_key: array<u32, SPK>;
var<workgroup> sh_r: array<f32, G * NT>;
// The rows' max and sum (read by head index: kept out of per-thread arrays, which a dynamic
// index would put in local memory).
var<workgroup> sh_m: array<f32, G>;
var<workgroup> sh_l: array<f32, G>;

fn s_get(i: u32) -> f32 {
    return sh_s[i / 4u][i % 4u];
}
fn s_set(i: u32, x: f32) {
    sh_s[i / 4u][i % 4u] = x;
}

// Tree reduction of sh_r[g * NT ..][0 .. NT) for every head g (max or sum) into sh_r[g * NT].
// Call in uniform control flow after the threads stored their values.
fn reduce_heads(tid: u32, is_max: bool) {
    workgroupBarrier();
    for (var h = NT / 2u; h > 0u; h >>= 1u) {
        if (tid < h) {
            for (var g = 0u; g < G; g++) {
                let a = sh_r[g * NT + tid];
                let b = sh_r[g * NT + tid + h];
                sh_r[g * NT + tid] = select(a + b, max(a, b), is_max);
            }
        }
        workgroupBarrier();
    }
}

// -inf, built at run time (a constant -inf is a shader-creation error in Chrome's Tint).
fn neg_inf() -> f32 {
    return bitcast<f32>(0xff800000u | (prm.n_q & 0u));
}

fn dot_acc(a: vec4<f32>, b: vec4<f32>, c: f32) -> f32 {
    return fma(a.w, b.w, fma(a.z, b.z, fma(a.y, b.y, fma(a.x, b.x, c))));
}

// Keys (cache rows) query `i` of a sequence of `len` tokens sees: [0, vis).
fn visible_end(len: u32, i: u32) -> u32 {
    if (len + i + 1u <= prm.n_q) {
        return 0u;
    }
    return len + i + 1u - prm.n_q;
}

// The row (of k, v, bias) of virtual key `vk`, or SENTINEL when it attends to nothing.
fn key_of(vk: u32, vend: u32, vis: u32, sel0: u32) -> u32 {
    if (vk >= vend) {
        return SENTINEL;
    }
//#if SPARSE
//#if SLOTS
    let pair = sel[sel0 + vk / BLK];
    let blk = pair.x;
    // A slot past the buffer (a corrupt pair) reads nothing.
    let base = select(SENTINEL, pair.y * BLK, pair.y < prm.stride / BLK);
//#else
    let blk = sel[sel0 + vk / BLK];
//#endif
    // Blocks past the visible range (and SENTINEL) first: blk * BLK could wrap.
    if (blk >= (vis + BLK - 1u) / BLK) {
        return SENTINEL;
    }
    let key = blk * BLK + vk % BLK;
//#if SLOTS
    return select(SENTINEL, base + vk % BLK, key < vis && base != SENTINEL);
//#else
    return select(SENTINEL, key, key < vis);
//#endif
//#else
    return vk;
//#endif
}

fn key_bias(u: u32, key: u32) -> f32 {
//#if HAS_BIAS
    return bias[prm.b_off + u * prm.stride + key] * LOG2E;
//#else
    return 0.0;
//#endif
}

//#if DQ
//#else
@compute @workgroup_size(NT)
fn partial(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let id = wg.y * prm.grid_x + wg.x;
    if (id >= prm.units * prm.n_q * prm.n_split) {
        return;
    }
    let split = id % prm.n_split;
    let row = id / prm.n_split;
    let i = row % prm.n_q;
    let u = row / prm.n_q;
    let len = min(lens[(prm.u0 + u) / prm.heads_kv], prm.cap);
    let vis = visible_end(len, i);
    let sel0 = prm.i_off + (u * prm.n_q + i) * prm.nsel;
//#if SPARSE
    let total = prm.nsel * BLK;
//#else
    let total = vis;
//#endif
    let v_begin = split * prm.split_keys;
    let v_end = min(v_begin + prm.split_keys, total);
    // Keys of this range (none when the row sees fewer keys than the range starts at).
    let n = min(select(0u, v_end - v_begin, v_end > v_begin), SPK);
    // Query row (u, g, i) starts at ((u * G + g) * n_q + i) * D4.
    let q4 = prm.q_off / 4u + (u * G * prm.n_q + i) * D4;
    let k4 = prm.k_off / 4u + u * prm.stride * D4;
    for (var e = tid; e < G * D4; e += NT) {
        sh_q[e] = unpack_st(q[q4 + (e / D4) * prm.n_q * D4 + e % D4]);
    }
    workgroupBarrier();

    // Phase 1: logits, thread per key. A masked key reads row 0 of its unit (always in the
    // buffer; loads stay unconditional: a load under a branch was waited for before the next).
    var mt: array<f32, G>;
    for (var g = 0u; g < G; g++) {
        mt[g] = NEG;
    }
    for (var j = tid; j < n; j += NT) {
        let key = key_of(v_begin + j, v_end, vis, sel0);
        sh_key[j] = key;
        let r4 = k4 + select(0u, key, key != SENTINEL) * D4;
        var s: array<f32, G>;
        for (var g = 0u; g < G; g++) {
            s[g] = 0.0;
        }
        for (var d0 = 0u; d0 < D4; d0 += KCV) {
            var kx: array<KW, KCV / KL>;
            for (var c = 0u; c < KCV / KL; c++) {
                kx[c] = k[(r4 + d0) / KL + c];
            }
            for (var c = 0u; c < KCV; c++) {
                let kc = k_part(kx[c / KL], c % KL);
                for (var g = 0u; g < G; g++) {
                    s[g] = dot_acc(sh_q[g * D4 + d0 + c], kc, s[g]);
                }
            }
        }
        var b = 0.0;
        if (key != SENTINEL) {
            b = key_bias(u, key);
        }
        for (var g = 0u; g < G; g++) {
            let x = select(NEG, fma(s[g], prm.scale_log2, b), key != SENTINEL);
            s_set(g * SPK + j, x);
            mt[g] = max(mt[g], x);
        }
    }
    // Softmax statistics (log2 domain): the row max, then exp2 in place and the row sum.
    for (var g = 0u; g < G; g++) {
        sh_r[g * NT + tid] = mt[g];
    }
    reduce_heads(tid, true);
    var m: array<f32, G>;
    for (var g = 0u; g < G; g++) {
        m[g] = sh_r[g * NT];
    }
    if (tid < G) {
        sh_m[tid] = sh_r[tid * NT];
    }
    workgroupBarrier();
    var lt: array<f32, G>;
    for (var g = 0u; g < G; g++) {
        lt[g] = 0.0;
    }
    for (var j = tid; j < n; j += NT) {
        for (var g = 0u; g < G; g++) {
            let x = s_get(g * SPK + j);
            let p = select(0.0, exp2(x - m[g]), x != NEG);
            s_set(g * SPK + j, p);
            lt[g] += p;
        }
    }
    for (var g = 0u; g < G; g++) {
        sh_r[g * NT + tid] = lt[g];
    }
    reduce_heads(tid, false);
    if (tid < G) {
        sh_l[tid] = sh_r[tid * NT];
    }
    workgroupBarrier();

    pv_all(tid, n, k4, u, i, split);
    if (tid < G) {
        let r = (u * G + tid) * prm.n_q + i;
        // A range with no visible key: O = 0 and LSE = NEG here, -inf in the final LSE.
        let lt = sh_l[tid];
        let mr = sh_m[tid];
//#if DIRECT
        lse[prm.r_off + r] = select(neg_inf(), (mr + log2(lt)) * LN2, lt > 0.0);
//#else
        lpart[prm.l_off + r * prm.n_split + split] = select(NEG, (mr + log2(lt)) * LN2, lt > 0.0);
//#endif
    }
}
//#endif

// Phase 2 (P V, or dS K with DQ): thread item it = (head group hg, vec4 column c) and key
// lane `lane`; with more items than threads (LANES = 1) a thread takes items tid, tid + NT, ...
// Call in uniform control flow.
fn pv_all(tid: u32, n: u32, k4: u32, u: u32, i: u32, split: u32) {
    let lane = tid / ITEMS;
    if (LANES == 1u) {
        for (var it = tid; it < ITEMS; it += NT) {
            write_out(pv(it, 0u, n, k4), it, u, i, split);
        }
    } else {
        let it = tid % ITEMS;
        var acc = pv(it, lane, select(0u, n, lane < LANES), k4);
        // Lanes 1.. add theirs to lane 0's one at a time (after the first barrier every
        // thread is done with the probabilities in sh_s).
        for (var r = 1u; r < LANES; r++) {
            workgroupBarrier();
            if (lane == r) {
                for (var gg = 0u; gg < GT; gg++) {
                    sh_s[it * GT + gg] = acc[gg];
                }
            }
            workgroupBarrier();
            if (lane == 0u) {
                for (var gg = 0u; gg < GT; gg++) {
                    acc[gg] += sh_s[it * GT + gg];
                }
            }
        }
        if (lane == 0u) {
            write_out(acc, it, u, i, split);
        }
    }
}

// Σ_j p_j v_j of item it (heads hg * GT .. +GT, vec4 column c) over keys lane, lane + LANES,
// .. < n of the range. V rows are read VU ahead; a masked or missing key reads row 0 of the
// unit and contributes 0.
fn pv(it: u32, lane: u32, n: u32, k4: u32) -> array<vec4<f32>, GT> {
    let hg = it / D4;
    let c = it % D4;
    var acc: array<vec4<f32>, GT>;
    for (var gg = 0u; gg < GT; gg++) {
        acc[gg] = vec4<f32>(0.0);
    }
    for (var j0 = lane; j0 < n; j0 += LANES * VU) {
        var vv: array<vec4<f32>, VU>;
        for (var jj = 0u; jj < VU; jj++) {
            let j = min(j0 + jj * LANES, SPK - 1u);
            let kj = select(SENTINEL, sh_key[j], j0 + jj * LANES < n);
//#if DQ
            vv[jj] = k_part(k[k4 + select(0u, kj, kj != SENTINEL) * D4 + c], 0u);
//#else
            vv[jj] = unpack_st(v[k4 + select(0u, kj, kj != SENTINEL) * D4 + c]);
//#endif
            vv[jj] = select(vec4<f32>(0.0), vv[jj], kj != SENTINEL);
        }
        for (var jj = 0u; jj < VU; jj++) {
            let j = min(j0 + jj * LANES, SPK - 1u);
            let live = j0 + jj * LANES < n;
            for (var gg = 0u; gg < GT; gg++) {
                let p = select(0.0, s_get((hg * GT + gg) * SPK + j), live);
                acc[gg] = fma(vec4<f32>(p), vv[jj], acc[gg]);
            }
        }
    }
    return acc;
}

// O of item it (heads hg * GT .. +GT, vec4 column c): the accumulated P V over the row sum.
fn write_out(acc: array<vec4<f32>, GT>, it: u32, u: u32, i: u32, split: u32) {
    let hg = it / D4;
    let c = it % D4;
    for (var gg = 0u; gg < GT; gg++) {
        let g = hg * GT + gg;
        let r = (u * G + g) * prm.n_q + i;
//#if DQ
        // dQ = scale Σ_j dS_j k_j (the logits were scaled after the dot products).
        o[prm.q_off / 4u + r * D4 + c] = pack_st(acc[gg] * (prm.scale_log2 * LN2));
//#else
        let lg = sh_l[g];
        let x = acc[gg] * select(0.0, 1.0 / lg, lg > 0.0);
//#if DIRECT
        o[prm.q_off / 4u + r * D4 + c] = pack_st(x);
//#else
        opart[prm.p_off / 4u + (r * prm.n_split + split) * D4 + c] = x;
//#endif
//#endif
    }
}

//#if DQ
//#else
// Tree reduction of sh_r[0 .. NT) (max or sum) into sh_r[0]; call in uniform control flow
// after the threads stored their values.
fn reduce_one(tid: u32, is_max: bool) {
    workgroupBarrier();
    for (var h = NT / 2u; h > 0u; h >>= 1u) {
        if (tid < h) {
            let a = sh_r[tid];
            let b = sh_r[tid + h];
            sh_r[tid] = select(a + b, max(a, b), is_max);
        }
        workgroupBarrier();
    }
}

// Vec4 columns of O per combine thread pass, and the split lanes that share a column.
const CL: u32 = max(NT / D4, 1u);

// One workgroup per output row (unit, query head, query): O = Σ_s w_s O_s / Σ_s w_s with
// w_s = exp(LSE_s − max), LSE = max + ln Σ_s w_s. The splits are spread over the threads (a
// row's hundred splits walked by one thread waited on each load in turn).
@compute @workgroup_size(NT)
fn combine(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let r = wg.y * prm.grid_x + wg.x;
    if (r >= prm.units * G * prm.n_q) {
        return;
    }
    let p0 = prm.l_off + r * prm.n_split;
    var mt = NEG;
    for (var s = tid; s < prm.n_split; s += NT) {
        mt = max(mt, lpart[p0 + s]);
    }
    sh_r[tid] = mt;
    reduce_one(tid, true);
    let mx = sh_r[0];
    workgroupBarrier();
    var tt = 0.0;
    for (var s = tid; s < prm.n_split; s += NT) {
        let lp = lpart[p0 + s];
        tt += select(0.0, exp(lp - mx), lp != NEG);
    }
    sh_r[tid] = tt;
    reduce_one(tid, false);
    let total = sh_r[0];
    let inv = select(0.0, 1.0 / total, total > 0.0);
    let lane = tid / D4;
    let ob = prm.p_off / 4u + r * prm.n_split * D4;
    for (var c0 = 0u; c0 < D4; c0 += NT) {
        let c = c0 + tid % D4;
        var x = vec4<f32>(0.0);
        if (lane < CL && c < D4) {
            for (var s = lane; s < prm.n_split; s += CL) {
                let lp = lpart[p0 + s];
                let w = select(0.0, exp(lp - mx), lp != NEG);
                x = fma(vec4<f32>(w), select(vec4<f32>(0.0), opart[ob + s * D4 + c], lp != NEG), x);
            }
        }
        // Lanes 1.. add theirs to lane 0's (sh_s holds D4 vec4: SPK >= D).
        for (var l = 1u; l < CL; l++) {
            workgroupBarrier();
            if (lane == l && c < D4) {
                sh_s[c] = x;
            }
            workgroupBarrier();
            if (lane == 0u && c < D4) {
                x += sh_s[c];
            }
        }
        if (lane == 0u && c < D4) {
            o[prm.q_off / 4u + r * D4 + c] = pack_st(x * inv);
        }
    }
    if (tid == 0u) {
        lse[prm.r_off + r] = select(neg_inf(), mx + log(total), total > 0.0);
    }
}
//#endif

//#if DQ
// dQ of the rows `partial` computed (sparse attention's backward at small groups: the
// forward's layout, one range per row: n_split = 1, SPK >= the row's keys; every sequence
// holds `cap` tokens). Phase 1, thread per key: S = q·k (scaled, + bias), P = exp(S - LSE),
// dP = dO·v, dS = P (dP - D) into sh_s; phase 2: dQ = scale Σ_j dS_j k_j as P V above.
@compute @workgroup_size(NT)
fn dq(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let id = wg.y * prm.grid_x + wg.x;
    if (id >= prm.units * prm.n_q) {
        return;
    }
    let i = id % prm.n_q;
    let u = id / prm.n_q;
    let vis = visible_end(prm.cap, i);
    let sel0 = prm.i_off + (u * prm.n_q + i) * prm.nsel;
//#if SPARSE
    let total = prm.nsel * BLK;
//#else
    let total = vis;
//#endif
    let n = min(total, SPK);
    let q4 = prm.q_off / 4u + (u * G * prm.n_q + i) * D4;
    let k4 = prm.k_off / 4u + u * prm.stride * D4;
    for (var e = tid; e < G * D4; e += NT) {
        let at = q4 + (e / D4) * prm.n_q * D4 + e % D4;
        sh_q[e] = unpack_st(q[at]);
        sh_do[e] = unpack_st(d_o[at]);
    }
    if (tid < G) {
        let r = (u * G + tid) * prm.n_q + i;
        // LSE in the log2 domain (-inf for a row with no visible key: all its P are 0).
        sh_m[tid] = lse[prm.r_off + r] * LOG2E;
        sh_l[tid] = rowd[prm.r_off + r];
    }
    workgroupBarrier();
    for (var j = tid; j < n; j += NT) {
        let key = key_of(j, total, vis, sel0);
        sh_key[j] = key;
        let r4 = k4 + select(0u, key, key != SENTINEL) * D4;
        var s: array<f32, G>;
        var dp: array<f32, G>;
        for (var g = 0u; g < G; g++) {
            s[g] = 0.0;
            dp[g] = 0.0;
        }
        for (var d0 = 0u; d0 < D4; d0 += KCV) {
            var kx: array<KW, KCV / KL>;
            var vx: array<vec4<f32>, KCV>;
            for (var c = 0u; c < KCV / KL; c++) {
                kx[c] = k[(r4 + d0) / KL + c];
            }
            for (var c = 0u; c < KCV; c++) {
                vx[c] = unpack_st(v[r4 + d0 + c]);
            }
            for (var c = 0u; c < KCV; c++) {
                let kc = k_part(kx[c / KL], c % KL);
                for (var g = 0u; g < G; g++) {
                    s[g] = dot_acc(sh_q[g * D4 + d0 + c], kc, s[g]);
                    dp[g] = dot_acc(sh_do[g * D4 + d0 + c], vx[c], dp[g]);
                }
            }
        }
        var b = 0.0;
        if (key != SENTINEL) {
            b = key_bias(u, key);
        }
        for (var g = 0u; g < G; g++) {
            let m = sh_m[g];
            let p = select(0.0, exp2(fma(s[g], prm.scale_log2, b) - m), key != SENTINEL && m > NEG);
            s_set(g * SPK + j, p * (dp[g] - sh_l[g]));
        }
    }
    workgroupBarrier();
    pv_all(tid, n, k4, u, i, 0u);
}
//#endif
