// Full attention backward (FlashAttention-2 style recomputation), portable f32. Two entries,
// after D_i = dO_i · O_i (shaders/rowdot.wgsl):
//   dkdv:   per key tile, loop over the G query heads of the group and the query tiles:
//           Pᵀ = exp(s·K Qᵀ − LSE), dPᵀ = V dOᵀ, dSᵀ = Pᵀ ∘ (dPᵀ − D),
//           dV += Pᵀ dO, dK += s·dSᵀ Q              (GQA sums happen in registers, no atomics)
//   dq_main: per query tile, loop over key tiles: P, dP = dO Vᵀ, dS, dQ += s·dS K
// Thread (ty, tx) owns rows ty*TM.. of the tile's first operand, logit columns tx + TC*j and
// gradient vec4 columns tx + TC*j. Constants: see common.wgsl, and HAS_BIAS: an additive
// per-key bias [b, hkv, seq_k] on the logits, whose gradient d bias_j = Σ dS_ij over the
// group's heads and queries dkdv sums in registers (its workgroup owns the key: no atomics).
//#include "common.wgsl"
//#include "key_bias.wgsl"

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
//#if HAS_BIAS
@group(0) @binding(11) var<storage, read> bias: array<f32>;
@group(0) @binding(12) var<storage, read_write> dbias: array<f32>;
//#endif

// dkdv: sh0 stages K|V|Q|dO chunks [rows][DSV], then dO|Q chunks [PC][D4];
//       sh1 = Pᵀ [BK][BQ]; sh2 = dSᵀ [BK][BQ], then LSE·log2(e) [BQ] and D [BQ].
// dq:   sh0 stages Q|dO|K|V chunks [rows][DSV], then K chunks [PC][D4]; sh1 = dS [BQ][BK].

fn fetch(which: u32, g: u32) -> vec4<f32> {
    switch which {
        case 0u: { return unpack_st(q[g]); }
        case 1u: { return unpack_st(d_o[g]); }
        case 2u: { return unpack_st(k[g]); }
        default: { return unpack_st(v[g]); }
    }
}

// S = Q Kᵀ and dP = dO Vᵀ for one (query tile, key tile), accumulated over the head dim in
// staged chunks. With kv_rows the thread tile's rows are keys (dkdv: Sᵀ, dPᵀ), else queries.
fn logits_and_dprobs(s: ptr<function, Logits>, dp: ptr<function, Logits>, kv_rows: bool,
                     q4: u32, row0: u32, k4: u32, key0: u32, tid: u32, ty: u32, tx: u32) {
    // sh0 rows: the thread tile's row operands first, then its column operands.
    let at_q = select(0u, 2u * BK, kv_rows);
    let at_k = select(2u * BQ, 0u, kv_rows);
    for (var i = 0u; i < TM * TN; i++) {
        (*s)[i] = 0.0;
        (*dp)[i] = 0.0;
    }
    for (var d0 = 0u; d0 < D4; d0 += DCV) {
        stage_chunk(0u, at_q, q4, row0, BQ, prm.seq_q, d0, tid);
        stage_chunk(1u, at_q + BQ, q4, row0, BQ, prm.seq_q, d0, tid);
        stage_chunk(2u, at_k, k4, key0, BK, prm.seq_k, d0, tid);
        stage_chunk(3u, at_k + BK, k4, key0, BK, prm.seq_k, d0, tid);
        workgroupBarrier();
        if (kv_rows) {
            logits_acc(s, at_k, at_q, ty, tx);
            logits_acc(dp, at_k + BK, at_q + BQ, ty, tx);
        } else {
            logits_acc(s, at_q, at_k, ty, tx);
            logits_acc(dp, at_q + BQ, at_k + BK, ty, tx);
        }
        workgroupBarrier();
    }
}

// dkdv: rows are keys (BK = TR*TM), columns are queries (BQ = TC*TN).
@compute @workgroup_size(NT)
fn dkdv(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let key0 = wg.x * BK;
    let kvh = wg.y;
    let k4 = (prm.k_off + kvh * prm.seq_k * D) / 4u;
    let ty = tid / TC;
    let tx = tid % TC;

    var gk: Acc;
    var gv: Acc;
    for (var i = 0u; i < TM * TD4; i++) {
        gk[i] = vec4<f32>(0.0);
        gv[i] = vec4<f32>(0.0);
    }
    var kb: Rows;
    var db: Rows;
    for (var i = 0u; i < TM; i++) {
        kb[i] = key_bias(kvh, key0 + ty * TM + i);
        db[i] = 0.0;
    }
    // The first query row that sees key0 (causal): q_pos0 + r >= key0.
    var qstart = 0u;
    if (prm.causal != 0u && key0 > prm.q_pos0) {
        qstart = ((key0 - prm.q_pos0) / BQ) * BQ;
    }
    for (var h = 0u; h < prm.group; h++) {
        let bh = kvh * prm.group + h;
        let q4 = (prm.q_off + bh * prm.seq_q * D) / 4u;
        let r_base = prm.r_off + bh * prm.seq_q;
        for (var row0 = qstart; row0 < prm.seq_q; row0 += BQ) {
            for (var e = tid; e < BQ; e += NT) {
                var a = 0.0;
                var b = 0.0;
                if (row0 + e < prm.seq_q) {
                    a = lse[r_base + row0 + e] * LOG2E;
                    b = rowd[r_base + row0 + e];
                }
                sh2_set(BK * BQ + e, a);
                sh2_set(BK * BQ + BQ + e, b);
            }
            var s: Logits;
            var dp: Logits;
            logits_and_dprobs(&s, &dp, true, q4, row0, k4, key0, tid, ty, tx);
            // Pᵀ and dSᵀ into sh1 / sh2 ([BK][BQ] each).
            for (var i = 0u; i < TM; i++) {
                let c = ty * TM + i;
                for (var j = 0u; j < TN; j++) {
                    let r = tx + TC * j;
                    let p = select(0.0,
                        exp2(fma(s[i * TN + j], prm.scale_log2, kb[i]) - sh2_get(BK * BQ + r)),
                        visible(row0 + r, key0 + c));
                    let ds = p * (dp[i * TN + j] - sh2_get(BK * BQ + BQ + r));
                    sh1_set(c * BQ + r, p);
                    sh2_set(c * BQ + r, ds);
                    db[i] += ds;
                }
            }
            workgroupBarrier();
            // dV += Pᵀ dO, dK += dSᵀ Q; dO and Q staged PC rows at a time: dO [PC][D4] | Q [PC][D4].
            for (var r0 = 0u; r0 < BQ; r0 += PC) {
                stage_rows(1u, 0u, q4, row0 + r0, prm.seq_q, tid);
                stage_rows(0u, PC * D4, q4, row0 + r0, prm.seq_q, tid);
                workgroupBarrier();
                rows_acc(&gv, 1u, BQ, r0, 0u, ty, tx);
                rows_acc(&gk, 2u, BQ, r0, PC * D4, ty, tx);
                workgroupBarrier();
            }
        }
    }
    for (var i = 0u; i < TM; i++) {
        let c = key0 + ty * TM + i;
        if (c < prm.seq_k) {
            for (var j = 0u; j < TD4; j++) {
                let g = k4 + c * D4 + tx + TC * j;
                dk[g] = pack_st(gk[i * TD4 + j] * prm.scale);
                dv[g] = pack_st(gv[i * TD4 + j]);
            }
        }
    }
//#if HAS_BIAS
    // d bias: the row totals of the per-thread partials (common.wgsl, fixed order).
    let db_total = row_totals(&db, ty, tx);
    for (var i = 0u; i < TM; i++) {
        let c = key0 + ty * TM + i;
        if (tx == 0u && c < prm.seq_k) {
            dbias[prm.b_off + kvh * prm.seq_k + c] = db_total[i];
        }
    }
//#endif
}

// dq_main: rows are queries (BQ = TR*TM), columns are keys (BK = TC*TN).
@compute @workgroup_size(NT)
fn dq_main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let row0 = wg.x * BQ;
    let bh = wg.y;
    let kvh = bh / prm.group;
    let q4 = (prm.q_off + bh * prm.seq_q * D) / 4u;
    let k4 = (prm.k_off + kvh * prm.seq_k * D) / 4u;
    let r_base = prm.r_off + bh * prm.seq_q;
    let ty = tid / TC;
    let tx = tid % TC;

    var lse2: array<f32, TM>;
    var rd: array<f32, TM>;
    var g: Acc;
    for (var i = 0u; i < TM; i++) {
        let r = row0 + ty * TM + i;
        lse2[i] = 0.0;
        rd[i] = 0.0;
        if (r < prm.seq_q) {
            lse2[i] = lse[r_base + r] * LOG2E;
            rd[i] = rowd[r_base + r];
        }
    }
    for (var i = 0u; i < TM * TD4; i++) {
        g[i] = vec4<f32>(0.0);
    }
    let kend = key_end(row0);
    for (var key0 = 0u; key0 < kend; key0 += BK) {
        var s: Logits;
        var dp: Logits;
        logits_and_dprobs(&s, &dp, false, q4, row0, k4, key0, tid, ty, tx);
        for (var j = 0u; j < TN; j++) {
            let c = tx + TC * j;
            let b = key_bias(kvh, key0 + c);
            for (var i = 0u; i < TM; i++) {
                let r = ty * TM + i;
                let p = select(0.0, exp2(fma(s[i * TN + j], prm.scale_log2, b) - lse2[i]),
                    visible(row0 + r, key0 + c));
                sh1_set(r * BK + c, p * (dp[i * TN + j] - rd[i]));
            }
        }
        workgroupBarrier();
        // dQ += dS K, K staged PC keys at a time.
        for (var c0 = 0u; c0 < BK; c0 += PC) {
            stage_rows(2u, 0u, k4, key0 + c0, prm.seq_k, tid);
            workgroupBarrier();
            rows_acc(&g, 1u, BK, c0, 0u, ty, tx);
            workgroupBarrier();
        }
    }
    for (var i = 0u; i < TM; i++) {
        let r = row0 + ty * TM + i;
        if (r < prm.seq_q) {
            for (var j = 0u; j < TD4; j++) {
                dq[q4 + r * D4 + tx + TC * j] = pack_st(g[i * TD4 + j] * prm.scale);
            }
        }
    }
}
