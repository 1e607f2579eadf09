// SSA's alignment loss and both gradients in one pass over the data (PAPERS.md §2; reference:
// src/reference/align.rs). With d = h_full − h_sparse over N elements and SmoothL1 (beta β):
//   L = SmoothL1(h_full, sg(h_sparse)) + SmoothL1(h_sparse, sg(h_full)) = (2/N) Σ ρ(d),
//   ρ(d) = d²/(2β) if |d| < β else |d| − β/2,
//   dL/dh_full = ψ(d)/N, dL/dh_sparse = −ψ(d)/N, ψ(d) = clamp(d/β, −1, 1)
// (each term's stop-gradient leaves one direction per stream). Gradients are scaled by `scale`
// (the upstream factor, e.g. alpha / layers). Two entries:
//   align:    gradients, and Σ ρ of each workgroup's slice into partials[]   (NT threads)
//   finalize: L = (2/N) Σ partials, in a fixed order (one workgroup): deterministic.

struct AlignParams {
    count: u32,      // elements in this launch
    grid_x: u32,     // workgroups along x (2-D grid flattened)
    skip: u32,       // first element of this launch inside its binding windows
    part0: u32,      // first partial this launch writes
    parts: u32,      // finalize: partials in all
    beta: f32,
    inv_beta: f32,
    scale_n: f32,    // scale / N (gradients)
    loss_n: f32,     // 2 / N (loss)
    _p0: u32,
    _p1: u32,
    _p2: u32,
}

@group(0) @binding(0) var<uniform> prm: AlignParams;
@group(0) @binding(1) var<storage, read> h_full: array<f32>;
@group(0) @binding(2) var<storage, read> h_sparse: array<f32>;
@group(0) @binding(3) var<storage, read_write> g_full: array<f32>;
@group(0) @binding(4) var<storage, read_write> g_sparse: array<f32>;
@group(0) @binding(5) var<storage, read_write> partials: array<f32>;
@group(0) @binding(6) var<storage, read_write> loss: array<f32>;

var<workgroup> sh: array<f32, NT>;

// Tree sum of sh[0..NT) into sh[0] (NT is a power of two); call in uniform control flow.
fn tree_sum(tid: u32) {
    for (var s = NT / 2u; s > 0u; s >>= 1u) {
        workgroupBarrier();
        if (tid < s) {
            sh[tid] += sh[tid + s];
        }
    }
    workgroupBarrier();
}

@compute @workgroup_size(NT)
fn align(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let w = wg.y * prm.grid_x + wg.x;
    // Each workgroup takes PER consecutive elements, each thread every NT-th of them.
    var acc = 0.0;
    for (var j = 0u; j < PER; j += NT) {
        let i = w * PER + j + tid;
        if (i < prm.count) {
            let at = prm.skip + i;
            let d = h_full[at] - h_sparse[at];
            let a = abs(d);
            acc += select(a - 0.5 * prm.beta, 0.5 * d * d * prm.inv_beta, a < prm.beta);
            let g = clamp(d * prm.inv_beta, -1.0, 1.0) * prm.scale_n;
            g_full[at] = g;
            g_sparse[at] = -g;
        }
    }
    sh[tid] = acc;
    tree_sum(tid);
    if (tid == 0u) {
        partials[prm.part0 + w] = sh[0];
    }
}

@compute @workgroup_size(NT)
fn finalize(@builtin(local_invocation_index) tid: u32) {
    var acc = 0.0;
    for (var i = tid; i < prm.parts; i += NT) {
        acc += partials[i];
    }
    sh[tid] = acc;
    tree_sum(tid);
    if (tid == 0u) {
        loss[0] = sh[0] * prm.loss_n;
    }
}
