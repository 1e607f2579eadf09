// The decoding KV cache (src/decode/cache.rs): caches `[batch, heads_kv, CAP, D]` (+ a per-key
// bias `[batch, heads_kv, CAP]`), sequence b holding lens[b] tokens.
//   append: the first counts[b] of the n_new rows of new k, v (and bias) go to rows
//           lens[b] .. of sequence b's caches              (thread per vec4 element)
//   grow:   lens[b] += counts[b]                           (thread per sequence; after append)
// Rows past the capacity are dropped (the host refuses such appends; this keeps the kernel in
// bounds whatever lens holds). Constants: D, NT, HAS_BIAS.

const D4: u32 = D / 4u;

struct CacheParams {
    cap: u32,
    n_new: u32,
    heads_kv: u32,
    u0: u32,       // first (sequence, kv head) unit of this launch
    units: u32,
    batch: u32,
    grid_x: u32,
    k_off: u32,    // element offsets inside the bindings (multiples of 4)
    n_off: u32,
    b_off: u32,
    nb_off: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> prm: CacheParams;
@group(0) @binding(1) var<storage, read_write> cache_k: array<ST>;
@group(0) @binding(2) var<storage, read_write> cache_v: array<ST>;
@group(0) @binding(3) var<storage, read> new_k: array<ST>;
@group(0) @binding(4) var<storage, read> new_v: array<ST>;
@group(0) @binding(5) var<storage, read_write> lens: array<u32>;
@group(0) @binding(6) var<storage, read> counts: array<u32>;
//#if HAS_BIAS
@group(0) @binding(7) var<storage, read_write> cache_b: array<f32>;
@group(0) @binding(8) var<storage, read> new_b: array<f32>;
//#endif

@compute @workgroup_size(NT)
fn append(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let e = (wg.y * prm.grid_x + wg.x) * NT + tid;
    if (e >= prm.units * prm.n_new * D4) {
        return;
    }
    let u = e / (prm.n_new * D4);
    let j = (e / D4) % prm.n_new;
    let c = e % D4;
    let b = (prm.u0 + u) / prm.heads_kv;
    let pos = lens[b] + j;
    if (j >= counts[b] || pos >= prm.cap) {
        return;
    }
    let dst = prm.k_off / 4u + (u * prm.cap + pos) * D4 + c;
    let src = prm.n_off / 4u + (u * prm.n_new + j) * D4 + c;
    cache_k[dst] = new_k[src];
    cache_v[dst] = new_v[src];
//#if HAS_BIAS
    if (c == 0u) {
        cache_b[prm.b_off + u * prm.cap + pos] = new_b[prm.nb_off + u * prm.n_new + j];
    }
//#endif
}

@compute @workgroup_size(NT)
fn grow(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let b = wg.x * NT + tid;
    if (b < prm.batch) {
        lens[b] = min(lens[b] + counts[b], prm.cap);
    }
}
