// The decoding KV cache (src/decode/cache.rs): caches `[batch, heads_kv, ROWS, D]` (+ a per-key
// bias `[batch, heads_kv, ROWS]`), sequence b holding lens[b] <= CAP tokens; token t in row t,
// or, for a ring of ROWS < CAP rows (the recent tokens only), row t % ROWS. A launch takes new
// rows j0 .. j0 + n_rows of the n_new given (a ring takes long appends in parts).
//   append: the first counts[b] of the new rows of k, v (and bias) go to rows lens[b] .. of
//           sequence b's caches                            (thread per vec4 element)
//   grow:   lens[b] += this launch's part of counts[b]     (thread per sequence; after append)
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
    rows: u32,     // rows per unit (CAP, or the ring's)
    j0: u32,       // first new row of this launch, and rows it takes
    n_rows: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

// This launch's share of sequence b's counts[b] new rows.
fn launch_count(b: u32) -> u32 {
    return min(max(counts[b], prm.j0) - prm.j0, prm.n_rows);
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
    if (e >= prm.units * prm.n_rows * D4) {
        return;
    }
    let u = e / (prm.n_rows * D4);
    let j = (e / D4) % prm.n_rows;
    let c = e % D4;
    let b = (prm.u0 + u) / prm.heads_kv;
    let pos = lens[b] + j;
    if (j >= launch_count(b) || pos >= prm.cap) {
        return;
    }
    let row = u * prm.rows + pos % prm.rows;
    let dst = prm.k_off / 4u + row * D4 + c;
    let src = prm.n_off / 4u + (u * prm.n_new + prm.j0 + j) * D4 + c;
    cache_k[dst] = new_k[src];
    cache_v[dst] = new_v[src];
//#if HAS_BIAS
    if (c == 0u) {
        cache_b[prm.b_off + row] = new_b[prm.nb_off + u * prm.n_new + prm.j0 + j];
    }
//#endif
}

@compute @workgroup_size(NT)
fn grow(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let b = wg.x * NT + tid;
    if (b < prm.batch) {
        lens[b] = min(lens[b] + launch_count(b), prm.cap);
    }
}
