// Attention metrics (reference: src/reference/metrics.rs): for every (query head, token) the full
// attention's mass per key block (the block-level attention map), the share of that mass inside
// the selected blocks (attention sparsity), and the entropy. One thread per token; two passes
// over the visible keys (log-sum-exp, then the masses). Diagnostic, not a hot path.
// Constants from the launcher: D, BLK (block size), NT (threads).

const D4: u32 = D / 4u;
const NEG: f32 = -3.0e38;
const LN2: f32 = 0.6931471805599453;
const SENTINEL: u32 = 0xffffffffu;

struct MetParams {
    seq_q: u32,
    seq_k: u32,
    q_pos0: u32,
    causal: u32,
    group: u32,
    nb: u32,
    nsel: u32,
    scale_log2: f32,
    q_off: u32,   // element offsets inside the bindings (q and k: multiples of 4)
    k_off: u32,
    i_off: u32,
    m_off: u32,
    r_off: u32,
    _p0: u32,
    _p1: u32,
    _p2: u32,
}

@group(0) @binding(0) var<uniform> prm: MetParams;
@group(0) @binding(1) var<storage, read> q: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> k: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> sel: array<u32>;
@group(0) @binding(4) var<storage, read_write> mass: array<f32>;
@group(0) @binding(5) var<storage, read_write> sparsity: array<f32>;
@group(0) @binding(6) var<storage, read_write> entropy: array<f32>;

fn logit2(qv: ptr<function, array<vec4<f32>, D4>>, k0: u32) -> f32 {
    var acc = 0.0;
    for (var c = 0u; c < D4; c++) {
        let a = (*qv)[c];
        let b = k[k0 + c];
        acc = fma(a.w, b.w, fma(a.z, b.z, fma(a.y, b.y, fma(a.x, b.x, acc))));
    }
    return acc * prm.scale_log2;
}

@compute @workgroup_size(NT)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let t = wg.x * NT + tid;
    let bh = wg.y; // (batch, query head) inside this launch
    if (t >= prm.seq_q) {
        return;
    }
    let u = bh / prm.group;
    let row = bh * prm.seq_q + t;
    let end = select(prm.seq_k, min(prm.seq_k, prm.q_pos0 + t + 1u), prm.causal != 0u);
    let k4 = prm.k_off / 4u + u * prm.seq_k * D4;
    var qv: array<vec4<f32>, D4>;
    for (var c = 0u; c < D4; c++) {
        qv[c] = q[prm.q_off / 4u + row * D4 + c];
    }
    var m = NEG;
    var l = 0.0;
    for (var j = 0u; j < end; j++) {
        let x = logit2(&qv, k4 + j * D4);
        if (x > m) {
            l = l * exp2(m - x) + 1.0;
            m = x;
        } else {
            l += exp2(x - m);
        }
    }
    let lse2 = m + log2(l);
    let sel0 = prm.i_off + (u * prm.seq_q + t) * prm.nsel;
    let m0 = prm.m_off + row * prm.nb;
    var kept = 0.0;
    var h = 0.0;
    for (var b = 0u; b < prm.nb; b++) {
        var bm = 0.0;
        for (var j = b * BLK; j < min(b * BLK + BLK, end); j++) {
            let x = logit2(&qv, k4 + j * D4) - lse2;
            let a = exp2(x);
            bm += a;
            h -= a * x * LN2;
        }
        mass[m0 + b] = bm;
        var chosen = false;
        for (var s = 0u; s < prm.nsel; s++) {
            chosen = chosen || sel[sel0 + s] == b;
        }
        kept += select(0.0, bm, chosen);
    }
    sparsity[prm.r_off + row] = kept;
    entropy[prm.r_off + row] = h;
}
