// Decoding attention (flash-decoding; reference: src/reference/decode.rs): n_q new query tokens
// per sequence against its KV cache `[batch, heads_kv, CAP, D]`, sequence b holding lens[b]
// tokens, query i at position lens[b] - n_q + i (causal). The keys of one (sequence, kv head,
// query) are split into n_split ranges, one workgroup each, so that one sequence still fills
// the GPU; each writes its softmax-normalised partial O and partial LSE, and `combine` merges
// them by their LSE. With one range (DIRECT) the workgroup writes O and LSE itself. The G query
// heads of a kv head share the workgroup (GQA: each key is read once for all of them).
// SPARSE: the keys are those of the blocks a selection names (BLK tokens each, SENTINEL none),
// "virtual" key v = entry v / BLK, offset v % BLK. SLOTS (with SPARSE; NOSA's offloaded cache):
// k, v and the bias hold `stride` rows per unit, BLK per slot, and each selection entry is a
// (block, slot) pair: the block masks, the slot locates. HAS_BIAS: an additive per-key bias.
// Constants: D (head dim), G (query heads per kv head), NT (threads = keys per tile), DCV / DSV
// (vec4 per K staging step, and its padded row stride), ACCN (output vec4 per thread), VU (V
// rows loaded ahead),
// SPARSE, BLK, HAS_BIAS, DIRECT. Lengths are clamped to the capacity and selections are checked
// against the length here, so no index leaves the buffers whatever the GPU-side inputs hold.

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
@group(0) @binding(2) var<storage, read> k: array<ST>;
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
@group(0) @binding(9) var<storage, read_write> opart: array<vec4<f32>>;
@group(0) @binding(10) var<storage, read_write> lpart: array<f32>;

var<workgroup> sh_q: array<vec4<f32>, G * D4>;
var<workgroup> sh_k: array<vec4<f32>, NT * DSV>;
var<workgroup> sh_p: array<f32, G * NT>;
var<workgroup> sh_key: array<u32, NT>;
var<workgroup> sh_m: array<f32, G>;
var<workgroup> sh_a: array<f32, G>;
var<workgroup> sh_l: array<f32, G>;

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
    // Query row (u, g, i) starts at ((u * G + g) * n_q + i) * D4.
    let q4 = prm.q_off / 4u + (u * G * prm.n_q + i) * D4;
    let k4 = prm.k_off / 4u + u * prm.stride * D4;
    for (var e = tid; e < G * D4; e += NT) {
        sh_q[e] = unpack_st(q[q4 + (e / D4) * prm.n_q * D4 + e % D4]);
    }

    var m = NEG;
    var l = 0.0;
    var acc: array<vec4<f32>, ACCN>;
    for (var n = 0u; n < ACCN; n++) {
        acc[n] = vec4<f32>(0.0);
    }
    for (var v0 = v_begin; v0 < v_end; v0 += NT) {
        sh_key[tid] = key_of(v0 + tid, v_end, vis, sel0);
        workgroupBarrier();
        // Logits of this thread's key against the G query heads, K staged DCV vec4 at a time
        // (coalesced rows; the padded stride keeps the row-per-thread reads conflict-free).
        var s: array<f32, G>;
        for (var g = 0u; g < G; g++) {
            s[g] = 0.0;
        }
        for (var d0 = 0u; d0 < D4; d0 += DCV) {
            // All DCV loads first, unconditionally (a masked key reads row 0 of its unit): a
            // load under a branch was waited for before the next one was issued.
            var kx: array<vec4<f32>, DCV>;
            for (var n = 0u; n < DCV; n++) {
                let e = tid + NT * n;
                let key = sh_key[e / DCV];
                kx[n] = unpack_st(k[k4 + select(0u, key, key != SENTINEL) * D4 + d0 + e % DCV]);
            }
            for (var n = 0u; n < DCV; n++) {
                let e = tid + NT * n;
                let live = sh_key[e / DCV] != SENTINEL;
                sh_k[(e / DCV) * DSV + e % DCV] = select(vec4<f32>(0.0), kx[n], live);
            }
            workgroupBarrier();
            for (var c = 0u; c < DCV; c++) {
                let kx = sh_k[tid * DSV + c];
                for (var g = 0u; g < G; g++) {
                    s[g] = dot_acc(sh_q[g * D4 + d0 + c], kx, s[g]);
                }
            }
            workgroupBarrier();
        }
        let key = sh_key[tid];
        var b = 0.0;
        if (key != SENTINEL) {
            b = key_bias(u, key);
        }
        for (var g = 0u; g < G; g++) {
            sh_p[g * NT + tid] = select(NEG, fma(s[g], prm.scale_log2, b), key != SENTINEL);
        }
        workgroupBarrier();
        // Online softmax per query head (log2 domain): thread g keeps row g's max and sum.
        if (tid < G) {
            var mt = NEG;
            for (var j = 0u; j < NT; j++) {
                mt = max(mt, sh_p[tid * NT + j]);
            }
            let mn = max(m, mt);
            sh_a[tid] = exp2(m - mn);
            sh_m[tid] = mn;
            m = mn;
        }
        workgroupBarrier();
        for (var g = 0u; g < G; g++) {
            let x = sh_p[g * NT + tid];
            sh_p[g * NT + tid] = select(0.0, exp2(x - sh_m[g]), x != NEG);
        }
        workgroupBarrier();
        if (tid < G) {
            var t = 0.0;
            for (var j = 0u; j < NT; j++) {
                t += sh_p[tid * NT + j];
            }
            l = l * sh_a[tid] + t;
        }
        // P V: thread owns output vec4 e = tid + NT * n of the G x D4 tile (row e / D4). V rows
        // are read VU at a time into registers before they are used: independent loads in
        // flight (one at a time left the loop waiting on memory). A masked key reads row 0 of
        // its unit (always in the buffer) and contributes 0.
        for (var n = 0u; n < ACCN; n++) {
            let e = tid + NT * n;
            if (e < G * D4) {
                let g = e / D4;
                let c = e % D4;
                var a = acc[n] * sh_a[g];
                for (var j0 = 0u; j0 < NT; j0 += VU) {
                    var vv: array<vec4<f32>, VU>;
                    for (var jj = 0u; jj < VU; jj++) {
                        let kj = sh_key[j0 + jj];
                        vv[jj] = unpack_st(v[k4 + select(0u, kj, kj != SENTINEL) * D4 + c]);
                    }
                    for (var jj = 0u; jj < VU; jj++) {
                        let live = sh_key[j0 + jj] != SENTINEL;
                        a = fma(vec4<f32>(sh_p[g * NT + j0 + jj]), select(vec4<f32>(0.0), vv[jj], live), a);
                    }
                }
                acc[n] = a;
            }
        }
        workgroupBarrier();
    }

    if (tid < G) {
        sh_l[tid] = l;
        sh_m[tid] = m;
    }
    workgroupBarrier();
    for (var n = 0u; n < ACCN; n++) {
        let e = tid + NT * n;
        if (e < G * D4) {
            let g = e / D4;
            let lt = sh_l[g];
            let x = acc[n] * select(0.0, 1.0 / lt, lt > 0.0);
            let r = (u * G + g) * prm.n_q + i;
//#if DIRECT
            o[prm.q_off / 4u + r * D4 + e % D4] = pack_st(x);
//#else
            opart[prm.p_off / 4u + (r * prm.n_split + split) * D4 + e % D4] = x;
//#endif
        }
    }
    if (tid < G) {
        let r = (u * G + tid) * prm.n_q + i;
        // A range with no visible key: O = 0 and LSE = NEG here, -inf in the final LSE.
        let lt = sh_l[tid];
//#if DIRECT
        lse[prm.r_off + r] = select(neg_inf(), (m + log2(lt)) * LN2, lt > 0.0);
//#else
        lpart[prm.l_off + r * prm.n_split + split] = select(NEG, (m + log2(lt)) * LN2, lt > 0.0);
//#endif
    }
}

// One workgroup per output row (unit, query head, query): O = Σ_s w_s O_s / Σ_s w_s with
// w_s = exp(LSE_s − max), LSE = max + ln Σ_s w_s.
@compute @workgroup_size(NT)
fn combine(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let r = wg.y * prm.grid_x + wg.x;
    if (r >= prm.units * G * prm.n_q) {
        return;
    }
    let p0 = prm.l_off + r * prm.n_split;
    var mx = NEG;
    for (var s = 0u; s < prm.n_split; s++) {
        mx = max(mx, lpart[p0 + s]);
    }
    var total = 0.0;
    for (var s = 0u; s < prm.n_split; s++) {
        total += select(0.0, exp(lpart[p0 + s] - mx), lpart[p0 + s] != NEG);
    }
    let inv = select(0.0, 1.0 / total, total > 0.0);
    for (var c = tid; c < D4; c += NT) {
        var x = vec4<f32>(0.0);
        for (var s = 0u; s < prm.n_split; s++) {
            let lp = lpart[p0 + s];
            if (lp != NEG) {
                x = fma(vec4<f32>(exp(lp - mx)), opart[prm.p_off / 4u + (r * prm.n_split + s) * D4 + c], x);
            }
        }
        o[prm.q_off / 4u + r * D4 + c] = pack_st(x * inv);
    }
    if (tid == 0u) {
        lse[prm.r_off + r] = select(neg_inf(), mx + log(total), total > 0.0);
    }
}
