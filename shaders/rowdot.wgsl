// D_i = dO_i · O_i, one thread per query row: the first step of every attention backward
// (dense and sparse), so it is its own kernel. Constants: D (head dim), NT (threads, = BQ rows
// per workgroup). The 2-D grid is flattened by prm.grid_x; prm.rows bounds the launch.
//#include "attn_params.wgsl"

@group(0) @binding(0) var<uniform> prm: Params;
@group(0) @binding(1) var<storage, read> o: array<ST>;
@group(0) @binding(2) var<storage, read> d_o: array<ST>;
@group(0) @binding(3) var<storage, read_write> rowd: array<f32>;

@compute @workgroup_size(NT)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let row = (wg.y * prm.grid_x + wg.x) * NT + tid;
    if (row >= prm.rows) {
        return;
    }
    let base = prm.q_off / 4u + row * D4;
    var acc = 0.0;
    for (var c = 0u; c < D4; c++) {
        acc += dot(unpack_st(d_o[base + c]), unpack_st(o[base + c]));
    }
    rowd[prm.r_off + row] = acc;
}
