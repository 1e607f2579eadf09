// Block-sparse attention backward on cooperative matrices (tensor cores): f16 q, k, v, dO, dQ,
// dK, dV; f32 LSE, D (= rowsum(dO ∘ O), from attention_bwd.wgsl's rowdot), bias and
// accumulators. Same contract and bindings as sparse_bwd.wgsl (reference:
// src/reference/sparse.rs); needs what sparse_coop.wgsl needs (src/ops/coop.rs checks it).
// Two entries; both bind all three gradients because the shared store (`put_out`) reaches each.
//
//   dq:   as sparse_coop.wgsl's forward: a subgroup per token, the group's G <= 16 query heads
//         as the 16 matrix rows, the selected blocks as one key list, BK keys per step:
//         S = Q Kᵀ, P = exp(s·S + bias − LSE), dP = dO Vᵀ, dS = P ∘ (dP − D), dQ += s·dS K.
//   dkdv: a workgroup per (key block, batch x kv head). Subgroup sg keeps the K and V fragments
//         of the block's 16-key chunk sg % KC (KC = BLK/16) in registers and takes tile sg / KC
//         of each round of NPH = NSG/KC tiles. A tile is TPT = 16/G tokens with all G heads of
//         each: the 16 columns of Sᵀ. The tokens that selected the block are found by scanning
//         the selection NT tokens at a time and compacted in token order (a prefix sum), so the
//         sums run in the same order every time (deterministic, no atomics). Per tile:
//         Sᵀ = K Qᵀ, Pᵀ, dPᵀ = V dOᵀ, dSᵀ = Pᵀ ∘ (dPᵀ − D), dV += Pᵀ dO, dK += s·dSᵀ Q
//         (Q and dO rows staged as coop_tile's key operand; dK and dV in accumulator
//         matrices). The NPH partial sums of a chunk are added through workgroup memory at the
//         end.
// Tile machinery: coop_tile.wgsl (dkdv runs with BK = 16: one 16-column tile per subgroup).
// Constants: those of coop_tile.wgsl, BLK, HAS_BIAS, KC, NPH, TPT.
//#include "attn_params.wgsl"
//#include "coop_tile.wgsl"
//#include "coop_kv.wgsl"
//#include "sparse_coop_list.wgsl"
//#include "token_line.wgsl"
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
@group(0) @binding(11) var<storage, read> sel: array<u32>;
//#if HAS_BIAS
@group(0) @binding(12) var<storage, read> bias: array<f32>;
@group(0) @binding(13) var<storage, read_write> dbias: array<f32>;
//#endif

// Which gradient store_acc (dQ) or store_o (dK, dV) writes: 0 = dQ, 1 = dK, 2 = dV.
var<private> out_to: u32;

fn put_out(i: u32, x: ST) {
    switch out_to {
        case 0u: { dq[i] = x; }
        case 1u: { dk[i] = x; }
        default: { dv[i] = x; }
    }
}

// The token's 16 head rows of q (which = 0) or dO (1) through the subgroup's staging area at
// `st` into fragments (rows past G, or of a token past the last, are zero).
fn head_fragments(tk: ptr<function, Token>, which: u32, st: u32, lane: u32,
                  fr: ptr<function, array<MatA, DQ>>) {
    workgroupBarrier();
    for (var e = lane; e < 16u * D4; e += 32u) {
        let h = e / D4;
        var x = ST(0.0);
        if ((*tk).live && h < prm.group) {
            let g = (*tk).q4 + h * (*tk).qstride + e % D4;
            x = select(d_o[g], q[g], which == 0u);
        }
        put4(st + h * DP + (e % D4) * 4u, x);
    }
    workgroupBarrier();
//#for I in 0..DQ
    (*fr)[{I}] = coopLoadT<MatA>(&kv[(st + {I} * 16u) / 4u], DP4);
//#endfor
}

@compute @workgroup_size(NT)
fn dq_coop(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    // Subgroups of 32 (checked on the host) hold consecutive invocations.
    let sg = tid / 32u;
    let lane = tid % 32u;
    var tk = token_of(wg.x * NSG + sg, wg.y);
    let st = sg * STAGE;
    var qa: array<MatA, DQ>;
    var da: array<MatA, DQ>;
    head_fragments(&tk, 0u, st, lane, &qa);
    head_fragments(&tk, 1u, st, lane, &da);

    let r = lane / 2u;
    let half = lane % 2u;
    var lse2 = 0.0;
    var rd = 0.0;
    if (tk.live && r < prm.group) {
        let row = prm.r_off + (tk.u * prm.group + r) * prm.seq_q + tk.t;
        lse2 = lse[row] * LOG2E;
        rd = rowd[row];
    }
    var acc: array<MatC, DQ>;
    let sb = sg * 16u * SP;
    let pb = sg * 16u * PP;

    let steps = (prm.nsel * BLK + BK - 1u) / BK;
    for (var step = 0u; step < steps; step++) {
        let i0 = step * BK;
        var keys = stage_step(&tk, i0, st, lane);
        scores(&qa, st, sb);
        var p: array<f32, HB>;
        for (var c = 0u; c < HB; c++) {
            let col = lane_col(c, HB, r, half);
            let key = step_key(&tk, &keys, col);
            let s = fma(scr[sb + r * SP + col], prm.scale_log2, key_bias(&tk, key));
            p[c] = select(0.0, exp2(s - lse2), key != NO_KEY);
        }
        // The subgroup's lanes have read S before dP overwrites it.
        workgroupBarrier();
        scores(&da, st + BK * DP, sb);
        for (var c = 0u; c < HB; c++) {
            let col = lane_col(c, HB, r, half);
            pm[pb + r * PP + col] = f16(p[c] * (scr[sb + r * SP + col] - rd));
        }
        workgroupBarrier();
        accumulate_o(&acc, st, pb);
    }
    out_to = 0u;
    store_acc(&acc, prm.scale, tk.q4, tk.qstride, select(0u, prm.group, tk.live), sb, r, half,
        lane);
}

// dkdv: the token line (as in sparse_bwd.wgsl) and the columns of the round's tiles.
// Every workgroup array here is a multiple of 64 bytes: with a 4-byte scalar or a 132-byte list
// beside them, the cooperative loads from `kv` read the wrong memory on the H100 (NaNs; the
// dense kernels, whose arrays are all multiples of 16 bytes, never showed it).
const GT: u32 = NPH * TPT;                        // tokens per round
var<workgroup> sh_list: array<u32, (NT + GT + 15u) / 16u * 16u>; // tokens waiting, in order
var<workgroup> col_lse: array<f32, NPH * 16u>;    // LSE·log2(e) of each column
var<workgroup> col_d: array<f32, NPH * 16u>;      // D of each column
var<workgroup> col_kvl: array<u32, NPH * 16u>;    // keys its token sees (0: padding)

// Stage a round: tokens sh_list[first, first + count) (count <= GT); tile ph takes tokens
// [ph·TPT, (ph + 1)·TPT) of them, column c = token c / G, head c % G. Q rows of the tile go to
// ph·32·DP, dO rows 16·DP after them.
fn stage_round(u: u32, first: u32, count: u32, tid: u32) {
    workgroupBarrier();
    for (var e = tid; e < NPH * 16u * D4; e += NT) {
        let ph = e / (16u * D4);
        let c = (e / D4) % 16u;
        let li = ph * TPT + c / prm.group;
        var a = ST(0.0);
        var b = ST(0.0);
        if (c < TPT * prm.group && li < count) {
            let t = sh_list[first + li];
            let g = (prm.q_off + ((u * prm.group + c % prm.group) * prm.seq_q + t) * D) / 4u
                + e % D4;
            a = q[g];
            b = d_o[g];
        }
        let s = ph * 32u * DP + c * DP + (e % D4) * 4u;
        put4(s, a);
        put4(s + 16u * DP, b);
    }
    for (var e = tid; e < NPH * 16u; e += NT) {
        let c = e % 16u;
        let li = (e / 16u) * TPT + c / prm.group;
        var a = 0.0;
        var b = 0.0;
        var kvl = 0u;
        if (c < TPT * prm.group && li < count) {
            let t = sh_list[first + li];
            let row = prm.r_off + (u * prm.group + c % prm.group) * prm.seq_q + t;
            a = lse[row] * LOG2E;
            b = rowd[row];
            kvl = select(prm.seq_k, min(prm.seq_k, prm.q_pos0 + t + 1u), prm.causal != 0u);
        }
        col_lse[e] = a;
        col_d[e] = b;
        col_kvl[e] = kvl;
    }
    workgroupBarrier();
}

// The chunk's dK or dV (`acc`, its 16 key rows times D, one accumulator matrix per 16
// columns) times `f` to the output from vec4 index `at` (rows D4 apart; rows at or past
// `nrows` not written): each phase's matrix through its scratch, phase 0 adding the NPH
// partial sums in phase order (deterministic) as it writes.
fn store_phases(acc: ptr<function, array<MatC, DQ>>, f: f32, at: u32, nrows: u32, ph: u32,
                kc: u32, sb: u32, lane: u32) {
//#for I in 0..DQ
    workgroupBarrier();
    coopStoreT((*acc)[{I}], &scr[sb], SP);
    workgroupBarrier();
    if (ph == 0u) {
        for (var e = lane; e < 64u; e += 32u) {
            let rr = e / 4u;
            let cc = e % 4u;
            var x = vec4<f32>(0.0);
            for (var p = 0u; p < NPH; p++) {
                let a = (p * KC + kc) * 16u * SP + rr * SP + cc * 4u;
                x += vec4<f32>(scr[a], scr[a + 1u], scr[a + 2u], scr[a + 3u]);
            }
            if (rr < nrows) {
                put_out(at + rr * D4 + {I} * 4u + cc, pack_st(x * f));
            }
        }
    }
//#endfor
}

@compute @workgroup_size(NT)
fn dkdv_coop(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let sg = tid / 32u;
    let lane = tid % 32u;
    let blk = wg.x;
    let u = wg.y;
    let key0 = blk * BLK;
    let kc = sg % KC;
    let ph = sg / KC;
    let k4 = (prm.k_off + u * prm.seq_k * D) / 4u;

    // K, then V rows of the block through the staging area into the chunk's fragments.
    var ka: array<MatA, DQ>;
    var va: array<MatA, DQ>;
    kv_fragments(&ka, &va, k4, key0, BLK, kc * 16u, tid);

    let r = lane / 2u;
    let half = lane % 2u;
    // dK and dV of the chunk's 16 keys in accumulator matrices (lane registers would be 128
    // floats a lane: the driver kept them in local memory, 512 bytes).
    var acck: array<MatC, DQ>;
    var accv: array<MatC, DQ>;
    let sb = sg * 16u * SP;
    let pb = sg * 16u * PP;
    let key0c = key0 + kc * 16u;
    var bk = 0.0;
    // This lane's share of d bias for key key0c + r: Σ dSᵀ over its columns.
    var dbk = 0.0;
//#if HAS_BIAS
    if (key0c + r < prm.seq_k) {
        bk = bias[prm.b_off + u * prm.seq_k + key0c + r] * LOG2E;
    }
//#endif
    let tstart = line_start(key0, tid);
    // The last pass (t0 >= seq_q) scans nothing and flushes the line in a partial round.
    for (var t0 = tstart; t0 < prm.seq_q + NT; t0 += NT) {
        let flush = t0 >= prm.seq_q;
        let n = line_append(t0, u, blk, tid);
        let rounds = select(n / GT, (n + GT - 1u) / GT, flush);
        for (var j = 0u; j < rounds; j++) {
            stage_round(u, j * GT, min(GT, n - j * GT), tid);
            // The subgroup's tile against its 16 keys (lane row r = key key0c + r):
            // Sᵀ = K Qᵀ, Pᵀ, dPᵀ = V dOᵀ, dSᵀ; dV += Pᵀ dO, dK += dSᵀ Q.
            let base = ph * 32u * DP;
            let cb = ph * 16u;
            scores(&ka, base, sb);
            var p: array<f32, HB>;
            for (var c = 0u; c < HB; c++) {
                let col = lane_col(c, HB, r, half);
                let x = fma(scr[sb + r * SP + col], prm.scale_log2, bk) - col_lse[cb + col];
                p[c] = select(0.0, exp2(x), key0c + r < col_kvl[cb + col]);
            }
            workgroupBarrier();
            scores(&va, base + 16u * DP, sb);
            var ds: array<f32, HB>;
            for (var c = 0u; c < HB; c++) {
                let col = lane_col(c, HB, r, half);
                ds[c] = p[c] * (scr[sb + r * SP + col] - col_d[cb + col]);
                dbk += ds[c];
                pm[pb + r * PP + col] = f16(p[c]);
            }
            workgroupBarrier();
            accumulate_o(&accv, base + 16u * DP, pb);
            // Every lane has read P before dS overwrites it.
            workgroupBarrier();
            for (var c = 0u; c < HB; c++) {
                pm[pb + r * PP + lane_col(c, HB, r, half)] = f16(ds[c]);
            }
            workgroupBarrier();
            accumulate_o(&acck, base, pb);
        }
        line_keep(min(n, rounds * GT), n, tid);
    }

//#if HAS_BIAS
    {
        // d bias: each key's two lanes in every phase, summed in a fixed order via the scratch.
        workgroupBarrier();
        scr[sb + lane] = dbk;
        workgroupBarrier();
        if (ph == 0u && half == 0u && key0c + r < prm.seq_k) {
            var sum = 0.0;
            for (var p = 0u; p < NPH; p++) {
                let ob = (p * KC + kc) * 16u * SP;
                sum += scr[ob + 2u * r] + scr[ob + 2u * r + 1u];
            }
            dbias[prm.b_off + u * prm.seq_k + key0c + r] = sum;
        }
        workgroupBarrier();
    }
//#endif
    var nrows = 0u;
    if (key0c < prm.seq_k) {
        nrows = min(16u, prm.seq_k - key0c);
    }
    out_to = 1u;
    store_phases(&acck, prm.scale, k4 + key0c * D4, nrows, ph, kc, sb, lane);
    out_to = 2u;
    store_phases(&accv, 1.0, k4 + key0c * D4, nrows, ph, kc, sb, lane);
}
