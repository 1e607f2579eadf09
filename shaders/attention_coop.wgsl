// Full attention forward on cooperative matrices (tensor cores): f16 q, k, v, o; f32 softmax
// state and accumulators. Needs SHADER_F16, SUBGROUP, EXPERIMENTAL_COOPERATIVE_MATRIX with
// 16x16x16 f16 x f16 -> f32, and subgroups of exactly 32 lanes (src/ops/coop.rs checks them).
//
// One workgroup per (query tile of BQ = 16·NSG rows, batch x query head); subgroup `sg` owns
// query rows sg·16 .. sg·16+15 and keeps their Q fragments in registers. Per key tile of BK keys
// (staged in workgroup memory, shared by the subgroups): S = Q Kᵀ, softmax, O += P V, through
// the shared tile machinery of coop_tile.wgsl (see there for why O lives in registers).
// K and V tiles are staged rather than loaded as matrices straight from the storage buffers
// (measured 2.2x slower on the H100), the next tile's vec4 loads in flight during this tile's
// products (staging with scalar loads cost 40% of the time).
//
// Written around what the H100's Vulkan driver (580.159) computes correctly: with a
// `workgroupUniformLoad` anywhere in the module every cooperative product came out zero
// (docs/BENCHMARKS.md). naga requires cooperative operations in uniform control flow, so their
// loops have constant bounds.
//
// Constants: those of coop_tile.wgsl, BQ = 16·NSG, NT = 32·NSG; KV = the K and V tiles
// (2·BK·DP halves) or the Q tile if larger. Storage is native f16 (ST = vec4<f16>).
//#include "attn_params.wgsl"
//#include "coop_tile.wgsl"
//#include "coop_kv.wgsl"
enable wgpu_cooperative_matrix;

@group(0) @binding(0) var<uniform> prm: Params;
@group(0) @binding(1) var<storage, read> q: array<ST>;
@group(0) @binding(2) var<storage, read> k: array<ST>;
@group(0) @binding(3) var<storage, read> v: array<ST>;
@group(0) @binding(4) var<storage, read_write> o: array<ST>;
@group(0) @binding(5) var<storage, read_write> lse: array<f32>;

fn put_out(i: u32, x: ST) {
    o[i] = x;
}

@compute @workgroup_size(NT)
fn fwd(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    // Subgroups of 32 (checked on the host) hold consecutive invocations.
    let sg = tid / 32u;
    let lane = tid % 32u;
    let row0 = wg.x * BQ;
    let bh = wg.y;
    let kvh = bh / prm.group;
    let q4 = (prm.q_off + bh * prm.seq_q * D) / 4u;
    let k4 = (prm.k_off + kvh * prm.seq_k * D) / 4u;

    for (var e = tid; e < BQ * D4; e += NT) {
        let r = e / D4;
        var x = ST(0.0);
        if (row0 + r < prm.seq_q) {
            x = q[q4 + (row0 + r) * D4 + e % D4];
        }
        put4(r * DP + (e % D4) * 4u, x);
    }
    workgroupBarrier();
    var qa: array<MatA, DQ>;
    for (var i = 0u; i < DQ; i++) {
        qa[i] = coopLoadT<MatA>(&kv[sg * 16u * DP + i * 16u], DP);
    }

    // Lane l: row l/2 of the subgroup's 16, columns of parity l%2 (the two lanes of a row share
    // m; l is per lane until the end). `acc` holds this lane's D/2 columns of O.
    let r = lane / 2u;
    let half = lane % 2u;
    let row = row0 + sg * 16u + r;
    var m = NEG;
    var l = 0.0;
    var acc: array<f32, D / 2u>;
    let sb = sg * 16u * SP;
    let pb = sg * 16u * PP;

    // The next K/V tile travels through registers while this one is multiplied. Keys at or past
    // kend (never visible to this query tile) are zero.
    let kend = key_end(row0);
    var pk: array<ST, NPW>;
    var pv: array<ST, NPW>;
    fetch_kv(&pk, &pv, k4, 0u, kend, tid);
    for (var key0 = 0u; key0 < kend; key0 += BK) {
        put_kv(&pk, &pv, tid);
        fetch_kv(&pk, &pv, k4, key0 + BK, kend, tid);

        scores(&qa, 0u, sb);
        var x: array<f32, HB>;
        for (var c = 0u; c < HB; c++) {
            let col = 2u * c + half;
            x[c] = select(NEG, scr[sb + r * SP + col] * prm.scale_log2, visible(row, key0 + col));
        }
        softmax_tile(&x, &m, &l, &acc, pb, r, half);
        accumulate_pv(&acc, BK * DP, sb, pb, r, half);
    }

    // O = acc / l, a round of OW slices at a time through the scratch, written as vec4 rows.
    let lt = l + subgroupShuffleXor(l, 1u);
    let inv = 1.0 / lt;
    let first = row0 + sg * 16u;
    let nrows = select(0u, min(16u, prm.seq_q - first), first < prm.seq_q);
    store_o(&acc, inv, q4 + first * D4, D4, nrows, sb, r, half, lane);
    if (row < prm.seq_q && half == 0u) {
        lse[prm.r_off + bh * prm.seq_q + row] = (m + log2(lt)) * LN2;
    }
}
