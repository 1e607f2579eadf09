// Full attention backward on cooperative matrices, FlashAttention-2 style recomputation (checked
// against src/reference/attention.rs by tests/attention.rs coop_backward_matches_reference).
// Two entries, dq_coop and dkdv_coop (below); both bind all three gradients because the shared
// store (`put_out`) reaches each of them.
// f16 q, k, v, dO, dQ; f32 LSE, D (= rowsum(dO ∘ O), from attention_bwd.wgsl's rowdot) and
// accumulators. Same bindings as attention_bwd.wgsl.
//
// One workgroup per (query tile of BQ = 16·NSG rows, batch x query head); subgroup `sg` keeps the
// Q and dO fragments of its 16 rows in registers. Per key tile of BK keys (K and V staged in
// workgroup memory, shared by the subgroups):
//   S  = Q Kᵀ            `scores` with the Q fragments over the K rows
//   P  = exp(s·S − LSE)  per lane (LSE known: no running maximum, P <= 1)
//   dP = dO Vᵀ           `scores` with the dO fragments over the V rows
//   dS = P ∘ (dP − D)    per lane, to workgroup memory as f16 (in place of P)
//   dQ += dS K           `accumulate_o` over the K rows (row-major B, as V in the forward)
// dQ = s · acc at the end (acc: D/16 accumulator matrices; dK, dV likewise in dkdv_coop).
// Tile machinery and constants: coop_tile.wgsl; BQ = 16·NSG, NT = 32·NSG.
//#include "attn_params.wgsl"
//#include "coop_tile.wgsl"
//#include "coop_kv.wgsl"
enable wgpu_cooperative_matrix;

@group(0) @binding(0) var<uniform> prm: Params;
@group(0) @binding(1) var<storage, read> q: array<ST>;
@group(0) @binding(2) var<storage, read> k: array<ST>;
@group(0) @binding(3) var<storage, read> v: array<ST>;
@group(0) @binding(5) var<storage, read> d_o: array<ST>;
@group(0) @binding(6) var<storage, read> lse: array<f32>;
@group(0) @binding(7) var<storage, read> rowd: array<f32>;
@group(0) @binding(8) var<storage, read_write> dq: array<ST>;
@group(0) @binding(9) var<storage, read_write> dk: array<ST>;
@group(0) @binding(10) var<storage, read_write> dv: array<ST>;

// Which gradient store_acc writes: 0 = dQ, 1 = dK, 2 = dV.
var<private> out_to: u32;

fn put_out(i: u32, x: ST) {
    switch out_to {
        case 0u: { dq[i] = x; }
        case 1u: { dk[i] = x; }
        default: { dv[i] = x; }
    }
}

// Rows [row0, row0 + BQ) of q (which = 0) or dO (1) into the staging area (zero past seq_q).
fn stage_rows(which: u32, q4: u32, row0: u32, tid: u32) {
    for (var e = tid; e < BQ * D4; e += NT) {
        let r = e / D4;
        var x = ST(0.0);
        if (row0 + r < prm.seq_q) {
            let g = q4 + (row0 + r) * D4 + e % D4;
            x = select(d_o[g], q[g], which == 0u);
        }
        put4(r * DP + (e % D4) * 4u, x);
    }
}

@compute @workgroup_size(NT)
fn dq_coop(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let sg = tid / 32u;
    let lane = tid % 32u;
    let row0 = wg.x * BQ;
    let bh = wg.y;
    let kvh = bh / prm.group;
    let q4 = (prm.q_off + bh * prm.seq_q * D) / 4u;
    let k4 = (prm.k_off + kvh * prm.seq_k * D) / 4u;

    // Q, then dO, through the staging area into this subgroup's fragments.
    var qa: array<MatA, DQ>;
    var da: array<MatA, DQ>;
    stage_rows(0u, q4, row0, tid);
    workgroupBarrier();
//#for I in 0..DQ
    qa[{I}] = coopLoadT<MatA>(&kv[(sg * 16u * DP + {I} * 16u) / 4u], DP4);
//#endfor
    workgroupBarrier();
    stage_rows(1u, q4, row0, tid);
    workgroupBarrier();
//#for I in 0..DQ
    da[{I}] = coopLoadT<MatA>(&kv[(sg * 16u * DP + {I} * 16u) / 4u], DP4);
//#endfor

    let r = lane / 2u;
    let half = lane % 2u;
    let row = row0 + sg * 16u + r;
    var lse2 = 0.0;
    var rd = 0.0;
    if (row < prm.seq_q) {
        lse2 = lse[prm.r_off + bh * prm.seq_q + row] * LOG2E;
        rd = rowd[prm.r_off + bh * prm.seq_q + row];
    }
    var acc: array<MatC, DQ>;
    let sb = sg * 16u * SP;
    let pb = sg * 16u * PP;

    let kend = key_end(row0);
    var pk: array<ST, NPW>;
    var pv: array<ST, NPW>;
    fetch_kv(&pk, &pv, k4, 0u, kend, tid);
    for (var key0 = 0u; key0 < kend; key0 += BK) {
        put_kv(&pk, &pv, tid);
        fetch_kv(&pk, &pv, k4, key0 + BK, kend, tid);

        scores(&qa, 0u, sb);
        var p: array<f32, HB>;
        for (var c = 0u; c < HB; c++) {
            let col = lane_col(c, HB, r, half);
            let s = scr[sb + r * SP + col];
            p[c] = select(0.0, exp2(s * prm.scale_log2 - lse2), visible(row, key0 + col));
        }
        // The subgroup's lanes have read S before dP overwrites it.
        workgroupBarrier();
        scores(&da, BK * DP, sb);
        for (var c = 0u; c < HB; c++) {
            let col = lane_col(c, HB, r, half);
            pm[pb + r * PP + col] = f16(p[c] * (scr[sb + r * SP + col] - rd));
        }
        workgroupBarrier();
        accumulate_o(&acc, 0u, pb);
    }

    let first = row0 + sg * 16u;
    let nrows = select(0u, min(16u, prm.seq_q - first), first < prm.seq_q);
    out_to = 0u;
    store_acc(&acc, prm.scale, q4 + first * D4, D4, nrows, sb, r, half, lane);
}

// LSE·log2(e) and D of the current query tile (dkdv_coop).
var<workgroup> tile_lse: array<f32, BK>;
var<workgroup> tile_d: array<f32, BK>;

// dK and dV for a key tile of BQ = 16·NSG keys (subgroup `sg` owns keys sg·16..; its K and V
// fragments stay in registers), summed over the G query heads of the group and the query tiles
// of BK queries that see the keys (Q and dO rows staged as the "key" operand of coop_tile):
//   Sᵀ = K Qᵀ, Pᵀ = exp(s·Sᵀ − LSE), dPᵀ = V dOᵀ, dSᵀ = Pᵀ ∘ (dPᵀ − D),
//   dV += Pᵀ dO, dK += s · dSᵀ Q.
@compute @workgroup_size(NT)
fn dkdv_coop(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let sg = tid / 32u;
    let lane = tid % 32u;
    let key0 = wg.x * BQ;
    let kvh = wg.y;
    let k4 = (prm.k_off + kvh * prm.seq_k * D) / 4u;

    // K, then V, through the staging area into this subgroup's fragments.
    var ka: array<MatA, DQ>;
    var va: array<MatA, DQ>;
    kv_fragments(&ka, &va, k4, key0, BQ, sg * 16u, tid);

    let r = lane / 2u;
    let half = lane % 2u;
    let key = key0 + sg * 16u + r;
    var acck: array<MatC, DQ>;
    var accv: array<MatC, DQ>;
    let sb = sg * 16u * SP;
    let pb = sg * 16u * PP;
    // The first query tile with a query that sees key0 (causal): q_pos0 + row >= key0.
    var qstart = 0u;
    if (prm.causal != 0u && key0 > prm.q_pos0) {
        qstart = ((key0 - prm.q_pos0) / BK) * BK;
    }
    for (var h = 0u; h < prm.group; h++) {
        let bh = kvh * prm.group + h;
        let q4 = (prm.q_off + bh * prm.seq_q * D) / 4u;
        let r_base = prm.r_off + bh * prm.seq_q;
        for (var row0 = qstart; row0 < prm.seq_q; row0 += BK) {
            // Q rows [0, BK) and dO rows [BK, 2·BK) of the staging area; LSE and D.
            workgroupBarrier();
            for (var e = tid; e < BK * D4; e += NT) {
                let rr = e / D4;
                var a = ST(0.0);
                var b = ST(0.0);
                if (row0 + rr < prm.seq_q) {
                    let g = q4 + (row0 + rr) * D4 + e % D4;
                    a = q[g];
                    b = d_o[g];
                }
                let s = rr * DP + (e % D4) * 4u;
                put4(s, a);
                put4(s + BK * DP, b);
            }
            for (var e = tid; e < BK; e += NT) {
                var a = 0.0;
                var b = 0.0;
                if (row0 + e < prm.seq_q) {
                    a = lse[r_base + row0 + e] * LOG2E;
                    b = rowd[r_base + row0 + e];
                }
                tile_lse[e] = a;
                tile_d[e] = b;
            }
            workgroupBarrier();

            scores(&ka, 0u, sb);
            var p: array<f32, HB>;
            for (var c = 0u; c < HB; c++) {
                let col = lane_col(c, HB, r, half);
                let s = scr[sb + r * SP + col];
                p[c] = select(0.0, exp2(s * prm.scale_log2 - tile_lse[col]),
                    key < prm.seq_k && visible(row0 + col, key));
            }
            workgroupBarrier();
            scores(&va, BK * DP, sb);
            var ds: array<f32, HB>;
            for (var c = 0u; c < HB; c++) {
                let col = lane_col(c, HB, r, half);
                ds[c] = p[c] * (scr[sb + r * SP + col] - tile_d[col]);
                pm[pb + r * PP + col] = f16(p[c]);
            }
            workgroupBarrier();
            accumulate_o(&accv, BK * DP, pb);
            // Every lane's P fragments are loaded before dS overwrites them.
            workgroupBarrier();
            for (var c = 0u; c < HB; c++) {
                pm[pb + r * PP + lane_col(c, HB, r, half)] = f16(ds[c]);
            }
            workgroupBarrier();
            accumulate_o(&acck, 0u, pb);
        }
    }

    let first = key0 + sg * 16u;
    let nrows = select(0u, min(16u, prm.seq_k - first), first < prm.seq_k);
    out_to = 1u;
    store_acc(&acck, prm.scale, k4 + first * D4, D4, nrows, sb, r, half, lane);
    out_to = 2u;
    store_acc(&accv, 1.0, k4 + first * D4, D4, nrows, sb, r, half, lane);
}
