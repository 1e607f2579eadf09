// The token line of the sparse dK/dV kernels (sparse_bwd.wgsl, sparse_coop_bwd.wgsl): the tokens
// that selected a key block, found NT at a time and kept in token order by a prefix sum, so the
// sums over them always run in the same order (deterministic, no atomics). Needs prm, the sel
// binding, NT, and the includer's `sh_list` (room for NT tokens beyond a round). Arrays are
// multiples of 64 bytes: the cooperative-matrix kernels need it (docs/BENCHMARKS.md).

var<workgroup> sh_flags: array<u32, NT>;
var<workgroup> sh_pend: array<u32, 16>;  // [0]: tokens waiting in sh_list

// The first token that can see key `key0` (causal: q_pos0 + t >= key0). Also empties the line.
fn line_start(key0: u32, tid: u32) -> u32 {
    if (tid == 0u) {
        sh_pend[0] = 0u;
    }
    if (prm.causal != 0u && key0 > prm.q_pos0) {
        return key0 - prm.q_pos0;
    }
    return 0u;
}

// Append those of tokens [t0, t0 + NT) that selected block `blk` (of batch x kv head `u`) to the
// line; returns how many wait (the same in every invocation).
fn line_append(t0: u32, u: u32, blk: u32, tid: u32) -> u32 {
    let tt = t0 + tid;
    var hit = 0u;
    if (tt < prm.seq_q) {
        let sel0 = prm.i_off + (u * prm.seq_q + tt) * prm.nsel;
        for (var si = 0u; si < prm.nsel; si++) {
            hit |= select(0u, 1u, sel[sel0 + si] == blk);
        }
    }
    // Inclusive prefix sum of the hits (Hillis-Steele) gives each hit its place in line.
    sh_flags[tid] = hit;
    workgroupBarrier();
    for (var off = 1u; off < NT; off <<= 1u) {
        var x = sh_flags[tid];
        if (tid >= off) {
            x += sh_flags[tid - off];
        }
        workgroupBarrier();
        sh_flags[tid] = x;
        workgroupBarrier();
    }
    let pending = sh_pend[0];
    if (hit != 0u) {
        sh_list[pending + sh_flags[tid] - 1u] = tt;
    }
    return workgroupUniformLoad(&sh_pend[0]) + workgroupUniformLoad(&sh_flags[NT - 1u]);
}

// Keep the waiting tokens [done, n) at the front of the line.
fn line_keep(done: u32, n: u32, tid: u32) {
    let rem = n - done;
    var keep = 0u;
    if (tid < rem) {
        keep = sh_list[done + tid];
    }
    workgroupBarrier();
    if (tid < rem) {
        sh_list[tid] = keep;
    }
    if (tid == 0u) {
        sh_pend[0] = rem;
    }
    workgroupBarrier();
}

// How many tokens wait (the same in every invocation).
fn line_waiting() -> u32 {
    return workgroupUniformLoad(&sh_pend[0]);
}
