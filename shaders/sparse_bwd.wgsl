// Block-sparse attention backward, portable f32 (reference: src/reference/sparse.rs, gradients
// by the chain rule as in src/reference/attention.rs). D = rowsum(dO ∘ O) comes from the dense
// `rowdot` entry. Two entries:
//   dq_main: per (token, batch x kv head): rows = the G query heads of the token, loop over its
//            selected blocks: P, dP = dO Vᵀ, dS = P ∘ (dP − D), dQ += s·dS K.
//   dkdv:    per (key block, batch x kv head): rows = the block's keys, loop over the tokens that
//            selected the block (found by scanning the selection, NT tokens at a time, so the
//            sums run in token order: deterministic, no atomics): Pᵀ, dPᵀ, dSᵀ,
//            dV += Pᵀ dO, dK += s·dSᵀ Q over the token's G heads.
// Extra constants: BLK (block size), HAS_BIAS.
//#include "common.wgsl"

@group(0) @binding(0) var<uniform> prm: Params;
@group(0) @binding(1) var<storage, read> q: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> k: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> v: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read> d_o: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read> lse: array<f32>;
@group(0) @binding(7) var<storage, read> rowd: array<f32>;
@group(0) @binding(8) var<storage, read_write> dq: array<vec4<f32>>;
@group(0) @binding(9) var<storage, read_write> dk: array<vec4<f32>>;
@group(0) @binding(10) var<storage, read_write> dv: array<vec4<f32>>;
@group(0) @binding(11) var<storage, read> sel: array<u32>;
@group(0) @binding(12) var<storage, read> bias: array<f32>;

const SENTINEL: u32 = 0xffffffffu;

fn fetch(which: u32, g: u32) -> vec4<f32> {
    switch which {
        case 0u: { return q[g]; }
        case 1u: { return d_o[g]; }
        case 2u: { return k[g]; }
        default: { return v[g]; }
    }
}

var<workgroup> sh_u: u32;
var<workgroup> sh_flags: array<u32, NT>;

fn key_bias(u: u32, c: u32) -> f32 {
    if (HAS_BIAS != 0u) {
        return bias[prm.b_off + u * prm.seq_k + c] * LOG2E;
    }
    return 0.0;
}

fn kv_len_of(t: u32) -> u32 {
    return select(prm.seq_k, min(prm.seq_k, prm.q_pos0 + t + 1u), prm.causal != 0u);
}

@compute @workgroup_size(NT)
fn dq_main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let t = wg.x;
    let u = wg.y;
    let ty = tid / TC;
    let tx = tid % TC;
    let kv_len = kv_len_of(t);
    let nb = (prm.seq_k + BLK - 1u) / BLK;
    let q4 = (prm.q_off + (u * prm.group * prm.seq_q + t) * D) / 4u;
    let qstride = prm.seq_q * D4;
    let k4 = (prm.k_off + u * prm.seq_k * D) / 4u;
    let sel0 = prm.i_off + (u * prm.seq_q + t) * prm.nsel;

    var lse2: Rows;
    var rd: Rows;
    for (var i = 0u; i < TM; i++) {
        let h = ty * TM + i;
        lse2[i] = 0.0;
        rd[i] = 0.0;
        if (h < prm.group) {
            let row = prm.r_off + (u * prm.group + h) * prm.seq_q + t;
            lse2[i] = lse[row] * LOG2E;
            rd[i] = rowd[row];
        }
    }
    var g: Acc;
    for (var i = 0u; i < TM * TD4; i++) {
        g[i] = vec4<f32>(0.0);
    }
    for (var si = 0u; si < prm.nsel; si++) {
        if (tid == 0u) {
            sh_u = sel[sel0 + si];
        }
        let blk = workgroupUniformLoad(&sh_u);
        if (blk >= nb) {
            continue;
        }
        for (var key0 = blk * BLK; key0 < min(blk * BLK + BLK, kv_len); key0 += BK) {
            var s: Logits;
            var dp: Logits;
            for (var i = 0u; i < TM * TN; i++) {
                s[i] = 0.0;
                dp[i] = 0.0;
            }
            for (var d0 = 0u; d0 < D4; d0 += DCV) {
                stage_strided(0u, 0u, q4, qstride, 0u, BQ, prm.group, d0, tid);
                stage_strided(1u, BQ, q4, qstride, 0u, BQ, prm.group, d0, tid);
                stage_chunk(2u, 2u * BQ, k4, key0, BK, kv_len, d0, tid);
                stage_chunk(3u, 2u * BQ + BK, k4, key0, BK, kv_len, d0, tid);
                workgroupBarrier();
                logits_acc(&s, 0u, 2u * BQ, ty, tx);
                logits_acc(&dp, BQ, 2u * BQ + BK, ty, tx);
                workgroupBarrier();
            }
            for (var j = 0u; j < TN; j++) {
                let c = key0 + tx + TC * j;
                let b = select(0.0, key_bias(u, c), c < kv_len);
                for (var i = 0u; i < TM; i++) {
                    let h = ty * TM + i;
                    let p = select(0.0, exp2(fma(s[i * TN + j], prm.scale_log2, b) - lse2[i]),
                        c < kv_len && h < prm.group);
                    sh1_set(h * BK + tx + TC * j, p * (dp[i * TN + j] - rd[i]));
                }
            }
            workgroupBarrier();
            for (var c0 = 0u; c0 < BK; c0 += PC) {
                stage_rows(2u, 0u, k4, key0 + c0, kv_len, tid);
                workgroupBarrier();
                rows_acc(&g, 1u, BK, c0, 0u, ty, tx);
                workgroupBarrier();
            }
        }
    }
    for (var i = 0u; i < TM; i++) {
        let h = ty * TM + i;
        if (h < prm.group) {
            for (var j = 0u; j < TD4; j++) {
                dq[q4 + h * qstride + tx + TC * j] = g[i * TD4 + j] * prm.scale;
            }
        }
    }
}

// dkdv: rows are the BK = BLK keys of block wg.x, columns the BQ (>= G) heads of one token.
@compute @workgroup_size(NT)
fn dkdv(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let blk = wg.x;
    let u = wg.y;
    let key0 = blk * BLK;
    let ty = tid / TC;
    let tx = tid % TC;
    let k4 = (prm.k_off + u * prm.seq_k * D) / 4u;
    let qstride = prm.seq_q * D4;

    var gk: Acc;
    var gv: Acc;
    for (var i = 0u; i < TM * TD4; i++) {
        gk[i] = vec4<f32>(0.0);
        gv[i] = vec4<f32>(0.0);
    }
    // The first token that can see key0 (causal): q_pos0 + t >= key0.
    var tstart = 0u;
    if (prm.causal != 0u && key0 > prm.q_pos0) {
        tstart = key0 - prm.q_pos0;
    }
    for (var t0 = tstart; t0 < prm.seq_q; t0 += NT) {
        // Which of the next NT tokens selected this block?
        let tt = t0 + tid;
        var hit = 0u;
        if (tt < prm.seq_q) {
            let sel0 = prm.i_off + (u * prm.seq_q + tt) * prm.nsel;
            for (var si = 0u; si < prm.nsel; si++) {
                hit |= select(0u, 1u, sel[sel0 + si] == blk);
            }
        }
        sh_flags[tid] = hit;
        workgroupBarrier();
        for (var n = 0u; n < NT; n++) {
            if (workgroupUniformLoad(&sh_flags[n]) == 0u) {
                continue;
            }
            let t = t0 + n;
            let kv_len = kv_len_of(t);
            let q4 = (prm.q_off + (u * prm.group * prm.seq_q + t) * D) / 4u;
            // LSE·log2(e) and D of the token's heads, after Pᵀ and dSᵀ in sh2.
            for (var h = tid; h < BQ; h += NT) {
                var a = 0.0;
                var b = 0.0;
                if (h < prm.group) {
                    let row = prm.r_off + (u * prm.group + h) * prm.seq_q + t;
                    a = lse[row] * LOG2E;
                    b = rowd[row];
                }
                sh2_set(BK * BQ + h, a);
                sh2_set(BK * BQ + BQ + h, b);
            }
            var s: Logits;
            var dp: Logits;
            for (var i = 0u; i < TM * TN; i++) {
                s[i] = 0.0;
                dp[i] = 0.0;
            }
            for (var d0 = 0u; d0 < D4; d0 += DCV) {
                stage_chunk(2u, 0u, k4, key0, BK, kv_len, d0, tid);
                stage_chunk(3u, BK, k4, key0, BK, kv_len, d0, tid);
                stage_strided(0u, 2u * BK, q4, qstride, 0u, BQ, prm.group, d0, tid);
                stage_strided(1u, 2u * BK + BQ, q4, qstride, 0u, BQ, prm.group, d0, tid);
                workgroupBarrier();
                logits_acc(&s, 0u, 2u * BK, ty, tx);
                logits_acc(&dp, BK, 2u * BK + BQ, ty, tx);
                workgroupBarrier();
            }
            for (var i = 0u; i < TM; i++) {
                let c = key0 + ty * TM + i;
                let b = select(0.0, key_bias(u, c), c < kv_len);
                for (var j = 0u; j < TN; j++) {
                    let h = tx + TC * j;
                    let p = select(0.0,
                        exp2(fma(s[i * TN + j], prm.scale_log2, b) - sh2_get(BK * BQ + h)),
                        c < kv_len && h < prm.group);
                    sh1_set((ty * TM + i) * BQ + h, p);
                    sh2_set((ty * TM + i) * BQ + h,
                        p * (dp[i * TN + j] - sh2_get(BK * BQ + BQ + h)));
                }
            }
            workgroupBarrier();
            for (var r0 = 0u; r0 < BQ; r0 += PC) {
                stage_rows_strided(1u, 0u, q4, qstride, r0, prm.group, tid);
                stage_rows_strided(0u, PC * D4, q4, qstride, r0, prm.group, tid);
                workgroupBarrier();
                rows_acc(&gv, 1u, BQ, r0, 0u, ty, tx);
                rows_acc(&gk, 2u, BQ, r0, PC * D4, ty, tx);
                workgroupBarrier();
            }
        }
        // sh_flags is rewritten by the next round only after everyone has read it.
        workgroupBarrier();
    }
    for (var i = 0u; i < TM; i++) {
        let c = key0 + ty * TM + i;
        if (c < prm.seq_k) {
            for (var j = 0u; j < TD4; j++) {
                let gi = k4 + c * D4 + tx + TC * j;
                dk[gi] = gk[i * TD4 + j] * prm.scale;
                dv[gi] = gv[i * TD4 + j];
            }
        }
    }
}
