// A Llama model's layers around attention, for the forward of `src/llama.rs` (no Burn): the
// token embedding, RMSNorm, linear layers as Y = X·Wᵀ (+ R), the split of q/k/v into heads with
// RoPE, the merge back, SwiGLU. f32 throughout. Offsets are in elements, relative to each
// binding's window (the launcher binds 256-byte-aligned windows). The host checks every shape
// and offset: the kernels run without bounds checks. Constants: NT (threads of the element
// kernels), RESID (matmul adds R).

struct LlmParams {
    n: u32,         // rows (tokens) of this launch; swiglu: elements
    k: u32,         // matmul: inner dim; rms_norm, embed: row length; heads, merge: head_dim
    m: u32,         // matmul: output columns of this launch; heads, merge: heads
    seq: u32,       // heads, merge: tokens per sequence
    x_off: u32,
    w_off: u32,
    y_off: u32,
    r_off: u32,
    y_stride: u32,  // matmul: elements per row of Y and R
    pos0: u32,      // heads: position of each sequence's first token
    grid_x: u32,    // element kernels and rms_norm: workgroups along x (flattened grids)
    v0: u32,        // embed: vocabulary rows [v0, v1) are bound in this launch
    v1: u32,
    rope: u32,      // heads: rotate (q, k) or not (v)
    eps: f32,       // rms_norm
    log2_base: f32, // heads: log2 of RoPE's base
}

@group(0) @binding(0) var<uniform> prm: LlmParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read> r: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;
@group(0) @binding(5) var<storage, read> ids: array<u32>;

fn element(wg: vec3<u32>, lid: u32) -> u32 {
    return (wg.y * prm.grid_x + wg.x) * NT + lid;
}

// y[t, :] = table[ids[t], :] for the tokens whose id lies in this launch's vocabulary rows.
@compute @workgroup_size(NT)
fn embed(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = element(wg, lid);
    if (i >= prm.n * prm.k) {
        return;
    }
    let t = i / prm.k;
    let c = i % prm.k;
    let id = ids[prm.x_off + t];
    if (id < prm.v0 || id >= prm.v1) {
        return;
    }
    y[prm.y_off + i] = w[prm.w_off + (id - prm.v0) * prm.k + c];
}

const NR: u32 = 64u;
var<workgroup> red: array<f32, NR>;

// One workgroup per row: y = x / sqrt(mean(x²) + eps) · γ.
@compute @workgroup_size(NR)
fn rms_norm(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = wg.y * prm.grid_x + wg.x;
    if (row >= prm.n) {
        return; // uniform per workgroup: no barrier is skipped by part of it
    }
    let base = prm.x_off + row * prm.k;
    var ss = 0.0;
    for (var c = lid; c < prm.k; c += NR) {
        let v = x[base + c];
        ss += v * v;
    }
    red[lid] = ss;
    workgroupBarrier();
    for (var s = NR / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            red[lid] += red[lid + s];
        }
        workgroupBarrier();
    }
    let scale = inverseSqrt(red[0] / f32(prm.k) + prm.eps);
    for (var c = lid; c < prm.k; c += NR) {
        y[prm.y_off + row * prm.k + c] = x[base + c] * scale * w[prm.w_off + c];
    }
}

// Y[n, m] = X[n, k] · W[m, k]ᵀ (+ R): 64 x 64 output tiles, 16 threads x 16 threads of 4 x 4,
// k in steps of 16 through workgroup memory. Tiles store k-major with a padded stride so that
// the loads (16 threads along k) do not share banks.
const BM: u32 = 64u;
const BK: u32 = 16u;
const SP: u32 = 65u;
var<workgroup> xs: array<f32, 1040>; // BK * SP
var<workgroup> ws: array<f32, 1040>;

@compute @workgroup_size(16, 16)
fn matmul(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_id) li: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    let r0 = wg.y * BM;
    let c0 = wg.x * BM;
    var acc: array<vec4<f32>, 4>;
    for (var k0 = 0u; k0 < prm.k; k0 += BK) {
        for (var i = 0u; i < 4u; i++) {
            let idx = tid + i * 256u;
            let row = idx / BK;
            let kk = idx % BK;
            let kin = k0 + kk < prm.k;
            var xv = 0.0;
            if (r0 + row < prm.n && kin) {
                xv = x[prm.x_off + (r0 + row) * prm.k + k0 + kk];
            }
            xs[kk * SP + row] = xv;
            var wv = 0.0;
            if (c0 + row < prm.m && kin) {
                wv = w[prm.w_off + (c0 + row) * prm.k + k0 + kk];
            }
            ws[kk * SP + row] = wv;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk++) {
            let xb = kk * SP + li.y * 4u;
            let wb = kk * SP + li.x * 4u;
            let b = vec4(ws[wb], ws[wb + 1u], ws[wb + 2u], ws[wb + 3u]);
            acc[0] += xs[xb] * b;
            acc[1] += xs[xb + 1u] * b;
            acc[2] += xs[xb + 2u] * b;
            acc[3] += xs[xb + 3u] * b;
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i++) {
        let row = r0 + li.y * 4u + i;
        if (row >= prm.n) {
            break;
        }
        for (var j = 0u; j < 4u; j++) {
            let col = c0 + li.x * 4u + j;
            if (col < prm.m) {
                var v = acc[i][j];
//#if RESID
                v += r[prm.r_off + row * prm.y_stride + col];
//#endif
                y[prm.y_off + row * prm.y_stride + col] = v;
            }
        }
    }
}

// Y = X·Wᵀ (+ R) for a few rows (decoding: one token per sequence): a workgroup per MV output
// columns, its NR threads splitting k, every row of X at once (n <= MV_ROWS). A 64 x 64 tile
// would leave most of the GPU idle at n = 1 (9 workgroups for 576 columns).
const MV: u32 = 4u;
const MV_ROWS: u32 = 8u;
var<workgroup> mv_red: array<f32, 2048>; // NR * MV * MV_ROWS

@compute @workgroup_size(NR)
fn matvec(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let c0 = (wg.y * prm.grid_x + wg.x) * MV;
    if (c0 >= prm.m) {
        return; // uniform per workgroup
    }
    var acc: array<array<f32, MV>, MV_ROWS>;
    for (var kk = lid; kk < prm.k; kk += NR) {
        var wv: array<f32, MV>;
        for (var j = 0u; j < MV; j++) {
            wv[j] = select(0.0, w[prm.w_off + min(c0 + j, prm.m - 1u) * prm.k + kk], c0 + j < prm.m);
        }
        for (var row = 0u; row < prm.n; row++) {
            let xv = x[prm.x_off + row * prm.k + kk];
            for (var j = 0u; j < MV; j++) {
                acc[row][j] += xv * wv[j];
            }
        }
    }
    for (var row = 0u; row < MV_ROWS; row++) {
        for (var j = 0u; j < MV; j++) {
            mv_red[(row * MV + j) * NR + lid] = acc[row][j];
        }
    }
    workgroupBarrier();
    for (var s = NR / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            for (var i = 0u; i < MV * MV_ROWS; i++) {
                mv_red[i * NR + lid] += mv_red[i * NR + lid + s];
            }
        }
        workgroupBarrier();
    }
    if (lid < MV * MV_ROWS) {
        let row = lid / MV;
        let col = c0 + lid % MV;
        if (row < prm.n && col < prm.m) {
            var v = mv_red[lid * NR];
//#if RESID
            v += r[prm.r_off + row * prm.y_stride + col];
//#endif
            y[prm.y_off + row * prm.y_stride + col] = v;
        }
    }
}

// [b·s, heads·d] token rows → [b, heads, s, d], pair i of a head rotated by
// pos · base^(-2i/d) (llama.cpp's adjacent pairs) when prm.rope is set. A thread per pair.
@compute @workgroup_size(NT)
fn heads(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let half = prm.k / 2u;
    let i = element(wg, lid);
    if (i >= prm.n * prm.m * half) {
        return;
    }
    let p = i % half;
    let h = (i / half) % prm.m;
    let t = i / (half * prm.m);
    let s = t % prm.seq;
    let src = prm.x_off + (t * prm.m + h) * prm.k + 2u * p;
    let dst = prm.y_off + (((t / prm.seq) * prm.m + h) * prm.seq + s) * prm.k + 2u * p;
    var a = x[src];
    var b = x[src + 1u];
    if (prm.rope != 0u) {
        let angle = f32(prm.pos0 + s) * exp2(-f32(2u * p) / f32(prm.k) * prm.log2_base);
        let cs = cos(angle);
        let sn = sin(angle);
        let a0 = a;
        a = a0 * cs - b * sn;
        b = a0 * sn + b * cs;
    }
    y[dst] = a;
    y[dst + 1u] = b;
}

// [b, heads, s, d] → [b·s, heads·d]: a thread per element.
@compute @workgroup_size(NT)
fn merge(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = element(wg, lid);
    if (i >= prm.n * prm.m * prm.k) {
        return;
    }
    let c = i % prm.k;
    let h = (i / prm.k) % prm.m;
    let t = i / (prm.k * prm.m);
    let s = t % prm.seq;
    y[prm.y_off + i] = x[prm.x_off + (((t / prm.seq) * prm.m + h) * prm.seq + s) * prm.k + c];
}

// y = silu(gate) ⊙ up, gate in x, up in r.
@compute @workgroup_size(NT)
fn swiglu(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = element(wg, lid);
    if (i >= prm.n) {
        return;
    }
    let g = x[prm.x_off + i];
    y[prm.y_off + i] = g / (1.0 + exp(-g)) * r[prm.r_off + i];
}
