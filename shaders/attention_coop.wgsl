// Full attention forward on cooperative matrices (tensor cores): f16 q, k, v, o; f32 softmax
// state and accumulators. Needs SHADER_F16, SUBGROUP, EXPERIMENTAL_COOPERATIVE_MATRIX with
// 16x16x16 f16 x f16 -> f32, and subgroups of exactly 32 lanes (src/ops/coop.rs checks them).
//
// One workgroup per (query tile of BQ = 16·NSG rows, batch x query head); subgroup `sg` owns
// query rows sg·16 .. sg·16+15 and keeps their Q fragments and their O (D/16 accumulator
// matrices) in registers. Per key tile of BK keys (staged in workgroup memory, shared by the
// subgroups): S = Q Kᵀ, softmax, O += P V, through the shared tile machinery of coop_tile.wgsl;
// past the tile's two workgroup barriers each subgroup only synchronises with itself.
// K and V tiles are staged rather than loaded as matrices straight from the storage buffers
// (measured 2.2x slower on the H100), the next tile's vec4 loads in flight during this tile's
// products (staging with scalar loads cost 40% of the time).
//
// Written around what the H100's Vulkan driver (580.159) computes correctly: with a
// `workgroupUniformLoad` anywhere in the module every cooperative product came out zero
// (docs/BENCHMARKS.md). Loops around cooperative operations have bounds uniform across the
// workgroup; the lazy rescale's branch is uniform across the subgroup only (coop_tile.wgsl).
//
// Constants: those of coop_tile.wgsl, BQ = 16·NSG, NT = 32·NSG; KV = the K and V tiles
// (2·BK·DP halves), QR = KV / DP rows of Q a staging round; SG_SYNC = 1. Storage is native f16
// (ST = vec4<f16>).
//#include "attn_params.wgsl"
//#include "coop_tile.wgsl"
//#include "coop_kv.wgsl"
enable wgpu_cooperative_matrix;
diagnostic(off, derivative_uniformity);

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

    // The Q tile through the staging area, QR rows a round; each subgroup takes its 16 rows'
    // fragments in the round that holds them.
    var qa: array<MatA, DQ>;
    for (var q0 = 0u; q0 < BQ; q0 += QR) {
        workgroupBarrier();
        for (var e = tid; e < QR * D4; e += NT) {
            let r = q0 + e / D4;
            var x = ST(0.0);
            if (r < BQ && row0 + r < prm.seq_q) {
                x = q[q4 + (row0 + r) * D4 + e % D4];
            }
            put4((r - q0) * DP + (e % D4) * 4u, x);
        }
        workgroupBarrier();
        if (sg * 16u >= q0 && sg * 16u < q0 + QR) {
//#for I in 0..DQ
            qa[{I}] = coopLoadT<MatA>(&kv[((sg * 16u - q0) * DP + {I} * 16u) / 4u], DP4);
//#endfor
        }
    }

    // Lane l: row l/2 of the subgroup's 16, columns of parity l%2 (the two lanes of a row share
    // m; l is per lane until the end). `o` holds the subgroup's 16 rows of O.
    let r = lane / 2u;
    let half = lane % 2u;
    let row = row0 + sg * 16u + r;
    var m = NEG;
    var l = 0.0;
    var o: array<MatC, DQ>;
    let sb = sg * 16u * SP;
    let pb = sg * 16u * PP;

    // The next K/V tile travels through registers while this one is multiplied. Keys at or past
    // kend (never visible to this query tile) are zero.
    let kend = key_end(row0);
    // Keys below this are visible to every row of the tile (rows past seq_q are never written):
    // tiles that end there skip the mask.
    let seen_by_all = select(prm.seq_k, min(prm.seq_k, prm.q_pos0 + row0 + 1u), prm.causal != 0u);
    var pk: array<ST, NPW>;
    var pv: array<ST, NPW>;
    fetch_kv(&pk, &pv, k4, 0u, kend, tid);
    for (var key0 = 0u; key0 < kend; key0 += BK) {
        put_kv(&pk, &pv, tid);
        fetch_kv(&pk, &pv, k4, key0 + BK, kend, tid);

        scores(&qa, 0u, sb);
        var x: array<f32, HB>;
        if (key0 + BK <= seen_by_all) {
            for (var c = 0u; c < HB; c++) {
                x[c] = scr[sb + r * SP + lane_col(c, HB, r, half)] * prm.scale_log2;
            }
        } else {
            for (var c = 0u; c < HB; c++) {
                let col = lane_col(c, HB, r, half);
                x[c] = select(NEG, scr[sb + r * SP + col] * prm.scale_log2,
                    visible(row, key0 + col));
            }
        }
        online_softmax(&x, &m, &l, &o, sb, pb, r, half);
        accumulate_o(&o, BK * DP, pb);
    }

    // O / l, a matrix at a time through the scratch, written as vec4 rows.
    let lt = l + subgroupShuffleXor(l, 1u);
    let inv = 1.0 / lt;
    let first = row0 + sg * 16u;
    let nrows = select(0u, min(16u, prm.seq_q - first), first < prm.seq_q);
    store_acc(&o, inv, q4 + first * D4, D4, nrows, sb, r, half, lane);
    if (row < prm.seq_q && half == 0u) {
        lse[prm.r_off + bh * prm.seq_q + row] = (m + log2(lt)) * LN2;
    }
}
