// Block-sparse attention forward on cooperative matrices (tensor cores): f16 q, k, v, o; f32
// softmax state, accumulators, LSE and bias. Same contract as sparse_fwd.wgsl (reference:
// src/reference/sparse.rs); needs what attention_coop.wgsl needs (src/ops/coop.rs checks it).
//
// One subgroup per (query token, batch x kv head): the 16 rows of its matrices are the G <= 16
// query heads of the group at that token (rows past G are zero), which share one selection, so
// every product is a full 16 x 16 x 16 tensor-core operation whatever the block size. A workgroup
// holds NSG subgroups, each with its own token and its own staging area. The selected blocks
// form one key list, walked in chunks of 16 keys, BK keys (NJ chunks) per step:
// the step's K and V rows go into the subgroup's staging area (keys of a sentinel block, past the
// token's causal limit or past seq_k are zero rows), then S = Q Kᵀ, softmax (invisible keys
// masked) and O += P V through the tile machinery of coop_tile.wgsl. Past the Q tile's barrier
// the subgroups never wait for each other (SG_SYNC = 1). Selections only choose addresses and
// masks: every subgroup runs the same ceil(nsel·BLK / BK) steps.
//
// Constants: those of coop_tile.wgsl (KV = NSG staging areas of 2·BK·DP halves), BLK (block
// size, multiple of 16), NT = 32·NSG, HAS_BIAS, SG_SYNC = 1. Storage is native f16
// (ST = vec4<f16>).
//#include "attn_params.wgsl"
//#include "coop_tile.wgsl"
//#include "sparse_coop_list.wgsl"
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
@group(0) @binding(6) var<storage, read> sel: array<u32>;
//#if HAS_BIAS
@group(0) @binding(7) var<storage, read> bias: array<f32>;
//#endif

// -inf for the LSE of a head that sees no key, built at run time (a constant -inf is a
// shader-creation error in WGSL; see sparse_fwd.wgsl).
fn neg_inf() -> f32 {
    return bitcast<f32>(0xff800000u | (prm.causal & 0u));
}

@compute @workgroup_size(NT)
fn fwd(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    // Subgroups of 32 (checked on the host) hold consecutive invocations.
    let sg = tid / 32u;
    let lane = tid % 32u;
    var tk = token_of(wg.x * NSG + sg, wg.y);
    let st = sg * STAGE;

    for (var e = lane; e < 16u * D4; e += 32u) {
        let h = e / D4;
        var x = ST(0.0);
        if (tk.live && h < prm.group) {
            x = q[tk.q4 + h * tk.qstride + e % D4];
        }
        put4(st + h * DP + (e % D4) * 4u, x);
    }
    workgroupBarrier();
    var qa: array<MatA, DQ>;
//#for I in 0..DQ
    qa[{I}] = coopLoadT<MatA>(&kv[(st + {I} * 16u) / 4u], DP4);
//#endfor

    let r = lane / 2u;
    let half = lane % 2u;
    var m = NEG;
    var l = 0.0;
    var o: array<MatC, DQ>;
    let sb = sg * 16u * SP;
    let pb = sg * 16u * PP;

    let steps = (prm.nsel * BLK + BK - 1u) / BK;
    // The next step's K/V rows travel through registers while this one is multiplied.
    var pk: array<ST, NPF>;
    var pv: array<ST, NPF>;
    var next = fetch_step(&tk, 0u, lane, &pk, &pv);
    for (var step = 0u; step < steps; step++) {
        let i0 = step * BK;
        var keys = next;
        put_step(st, lane, &pk, &pv);
        next = fetch_step(&tk, i0 + BK, lane, &pk, &pv);
        scores(&qa, st, sb);
        var x: array<f32, HB>;
        for (var c = 0u; c < HB; c++) {
            let col = lane_col(c, HB, r, half);
            let key = step_key(&tk, &keys, col);
            x[c] = select(NEG, fma(scr[sb + r * SP + col], prm.scale_log2, key_bias(&tk, key)),
                key != NO_KEY);
        }
        online_softmax(&x, &m, &l, &o, sb, pb, r, half);
        accumulate_o(&o, st + BK * DP, pb);
    }

    // O / l (0 for a head that sees no key), a matrix at a time.
    let lt = l + subgroupShuffleXor(l, 1u);
    let inv = select(0.0, 1.0 / lt, lt > 0.0);
    store_acc(&o, inv, tk.q4, tk.qstride, select(0u, prm.group, tk.live), sb, r, half, lane);
    if (tk.live && r < prm.group && half == 0u) {
        lse[prm.r_off + (tk.u * prm.group + r) * prm.seq_q + tk.t] =
            select(neg_inf(), (m + log2(lt)) * LN2, lt > 0.0);
    }
}
