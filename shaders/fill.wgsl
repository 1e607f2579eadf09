// Fill a tensor with reproducible pseudo-random values on the GPU, so that benchmarks on
// gigabyte tensors neither generate nor upload them from the host.
// x_i = scale * (2 * u(hash(seed, first + i)) - 1), uniform in [-scale, scale); the f16 entry
// writes the same values rounded, two per u32 word.

struct FillParams {
    count: u32,   // words in this launch (elements, or element pairs for f16)
    first: u32,   // index of the first element in the whole tensor (low 32 bits)
    seed: u32,
    grid_x: u32,  // workgroups along x (2-D grid flattened)
    skip: u32,    // first word inside the binding window
    scale: f32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> prm: FillParams;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(1) var<storage, read_write> out16: array<u32>;

// PCG-style integer hash (one round of the PCG output permutation).
fn pcg(v: u32) -> u32 {
    let state = v * 747796405u + 2891336453u;
    let word = ((state >> ((state >> 28u) + 4u)) ^ state) * 277803737u;
    return (word >> 22u) ^ word;
}

fn value(i: u32) -> f32 {
    let h = pcg(pcg(i) ^ prm.seed);
    let u = f32(h >> 8u) * (1.0 / 16777216.0);
    return prm.scale * (2.0 * u - 1.0);
}

@compute @workgroup_size(256)
fn uniform_fill(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let i = (wg.y * prm.grid_x + wg.x) * 256u + tid;
    if (i >= prm.count) {
        return;
    }
    out[prm.skip + i] = value(prm.first + i);
}

@compute @workgroup_size(256)
fn uniform_fill_f16(@builtin(workgroup_id) wg: vec3<u32>,
                    @builtin(local_invocation_index) tid: u32) {
    let i = (wg.y * prm.grid_x + wg.x) * 256u + tid;
    if (i >= prm.count) {
        return;
    }
    let e = prm.first + 2u * i;
    out16[prm.skip + i] = pack2x16float(vec2<f32>(value(e), value(e + 1u)));
}
