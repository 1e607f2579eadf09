// Full attention backward (FlashAttention-2 style recomputation), portable f32. Three entries:
//   rowdot: D_i = dO_i · O_i                       (one thread per query row)
//   dkdv:   per key tile, loop over the G query heads of the group and the query tiles:
//           Pᵀ = exp(s·K Qᵀ − LSE), dPᵀ = V dOᵀ, dSᵀ = Pᵀ ∘ (dPᵀ − D),
//           dV += Pᵀ dO, dK += s·dSᵀ Q              (GQA sums happen in registers, no atomics)
//   dq_main: per query tile, loop over key tiles: P, dP = dO Vᵀ, dS, dQ += s·dS K
// Thread (ty, tx) owns rows ty*TM.. of the tile's first operand, logit columns tx + TC*j and
// gradient vec4 columns tx + TC*j. Constants: see common.wgsl.
//#include "common.wgsl"

@group(0) @binding(0) var<uniform> prm: Params;
@group(0) @binding(1) var<storage, read> q: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> k: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> v: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> o: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read> d_o: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read> lse: array<f32>;
@group(0) @binding(7) var<storage, read_write> rowd: array<f32>;
@group(0) @binding(8) var<storage, read_write> dq: array<vec4<f32>>;
@group(0) @binding(9) var<storage, read_write> dk: array<vec4<f32>>;
@group(0) @binding(10) var<storage, read_write> dv: array<vec4<f32>>;

// dkdv: sh0 stages K|V|Q|dO chunks [rows][DSV], then dO|Q chunks [PC][D4];
//       sh1 = Pᵀ [BK][BQ]; sh2 = dSᵀ [BK][BQ], then LSE·log2(e) [BQ] and D [BQ].
// dq:   sh0 stages Q|dO|K|V chunks [rows][DSV], then K chunks [PC][D4]; sh1 = dS [BQ][BK].

// rowdot: NT threads per workgroup, one row each; 2-D grid flattened by grid_x.
@compute @workgroup_size(NT)
fn rowdot(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let row = (wg.y * prm.grid_x + wg.x) * NT + tid;
    if (row >= prm.rows) {
        return;
    }
    let base = prm.q_off / 4u + row * D4;
    var acc = 0.0;
    for (var c = 0u; c < D4; c++) {
        acc += dot(d_o[base + c], o[base + c]);
    }
    rowd[prm.r_off + row] = acc;
}

// Stage DC dims from d0v (in vec4) of rows [r0, r0 + n) of a tensor into sh0 at row `at`;
// rows at or past `len` read as zero. which: 0 q, 1 dO, 2 k, 3 v.
fn stage(which: u32, at: u32, base4: u32, r0: u32, n: u32, len: u32, d0v: u32, tid: u32) {
    for (var e = tid; e < n * DCV; e += NT) {
        let r = e / DCV;
        var x = vec4<f32>(0.0);
        if (r0 + r < len) {
            let g = base4 + (r0 + r) * D4 + d0v + e % DCV;
            switch which {
                case 0u: { x = q[g]; }
                case 1u: { x = d_o[g]; }
                case 2u: { x = k[g]; }
                default: { x = v[g]; }
            }
        }
        sh0[(at + r) * DSV + e % DCV] = x;
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

    var gk: array<vec4<f32>, TM * TD4>;
    var gv: array<vec4<f32>, TM * TD4>;
    for (var i = 0u; i < TM * TD4; i++) {
        gk[i] = vec4<f32>(0.0);
        gv[i] = vec4<f32>(0.0);
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
            var s: array<f32, TM * TN>;
            var dp: array<f32, TM * TN>;
            for (var i = 0u; i < TM * TN; i++) {
                s[i] = 0.0;
                dp[i] = 0.0;
            }
            for (var d0 = 0u; d0 < D4; d0 += DCV) {
                stage(2u, 0u, k4, key0, BK, prm.seq_k, d0, tid);
                stage(3u, BK, k4, key0, BK, prm.seq_k, d0, tid);
                stage(0u, 2u * BK, q4, row0, BQ, prm.seq_q, d0, tid);
                stage(1u, 2u * BK + BQ, q4, row0, BQ, prm.seq_q, d0, tid);
                workgroupBarrier();
                for (var dv4 = 0u; dv4 < DCV; dv4++) {
                    var ka: array<vec4<f32>, TM>;
                    var va: array<vec4<f32>, TM>;
                    for (var i = 0u; i < TM; i++) {
                        ka[i] = sh0[(ty * TM + i) * DSV + dv4];
                        va[i] = sh0[(BK + ty * TM + i) * DSV + dv4];
                    }
                    for (var j = 0u; j < TN; j++) {
                        let qb = sh0[(2u * BK + tx + TC * j) * DSV + dv4];
                        let ob = sh0[(2u * BK + BQ + tx + TC * j) * DSV + dv4];
                        for (var i = 0u; i < TM; i++) {
                            s[i * TN + j] = dot_acc(ka[i], qb, s[i * TN + j]);
                            dp[i * TN + j] = dot_acc(va[i], ob, dp[i * TN + j]);
                        }
                    }
                }
                workgroupBarrier();
            }
            // Pᵀ and dSᵀ into sh1 / sh2 ([BK][BQ] each).
            for (var i = 0u; i < TM; i++) {
                let c = ty * TM + i;
                for (var j = 0u; j < TN; j++) {
                    let r = tx + TC * j;
                    let p = select(0.0,
                        exp2(s[i * TN + j] * prm.scale_log2 - sh2_get(BK * BQ + r)),
                        visible(row0 + r, key0 + c));
                    sh1_set(c * BQ + r, p);
                    sh2_set(c * BQ + r, p * (dp[i * TN + j] - sh2_get(BK * BQ + BQ + r)));
                }
            }
            workgroupBarrier();
            // dV += Pᵀ dO, dK += dSᵀ Q; dO and Q staged PC rows at a time: dO [PC][D4] | Q [PC][D4].
            for (var r0 = 0u; r0 < BQ; r0 += PC) {
                for (var e = tid; e < PC * D4; e += NT) {
                    let r = e / D4;
                    var a = vec4<f32>(0.0);
                    var b = vec4<f32>(0.0);
                    if (row0 + r0 + r < prm.seq_q) {
                        let g = q4 + (row0 + r0 + r) * D4 + e % D4;
                        a = d_o[g];
                        b = q[g];
                    }
                    sh0[e] = a;
                    sh0[PC * D4 + e] = b;
                }
                workgroupBarrier();
                for (var r = 0u; r < PC; r += 4u) {
                    var pa: array<vec4<f32>, TM>;
                    var sa: array<vec4<f32>, TM>;
                    for (var i = 0u; i < TM; i++) {
                        pa[i] = sh1[((ty * TM + i) * BQ + r0 + r) / 4u];
                        sa[i] = sh2[((ty * TM + i) * BQ + r0 + r) / 4u];
                    }
                    for (var j = 0u; j < TD4; j++) {
                        let col = tx + TC * j;
                        let o0 = sh0[r * D4 + col];
                        let o1 = sh0[(r + 1u) * D4 + col];
                        let o2 = sh0[(r + 2u) * D4 + col];
                        let o3 = sh0[(r + 3u) * D4 + col];
                        let q0 = sh0[(PC + r) * D4 + col];
                        let q1 = sh0[(PC + r + 1u) * D4 + col];
                        let q2 = sh0[(PC + r + 2u) * D4 + col];
                        let q3 = sh0[(PC + r + 3u) * D4 + col];
                        for (var i = 0u; i < TM; i++) {
                            gv[i * TD4 + j] = axpy4(pa[i], o0, o1, o2, o3, gv[i * TD4 + j]);
                            gk[i * TD4 + j] = axpy4(sa[i], q0, q1, q2, q3, gk[i * TD4 + j]);
                        }
                    }
                }
                workgroupBarrier();
            }
        }
    }
    for (var i = 0u; i < TM; i++) {
        let c = key0 + ty * TM + i;
        if (c < prm.seq_k) {
            for (var j = 0u; j < TD4; j++) {
                let g = k4 + c * D4 + tx + TC * j;
                dk[g] = gk[i * TD4 + j] * prm.scale;
                dv[g] = gv[i * TD4 + j];
            }
        }
    }
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
    var g: array<vec4<f32>, TM * TD4>;
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
        var s: array<f32, TM * TN>;
        var dp: array<f32, TM * TN>;
        for (var i = 0u; i < TM * TN; i++) {
            s[i] = 0.0;
            dp[i] = 0.0;
        }
        for (var d0 = 0u; d0 < D4; d0 += DCV) {
            stage(0u, 0u, q4, row0, BQ, prm.seq_q, d0, tid);
            stage(1u, BQ, q4, row0, BQ, prm.seq_q, d0, tid);
            stage(2u, 2u * BQ, k4, key0, BK, prm.seq_k, d0, tid);
            stage(3u, 2u * BQ + BK, k4, key0, BK, prm.seq_k, d0, tid);
            workgroupBarrier();
            for (var dv4 = 0u; dv4 < DCV; dv4++) {
                var qa: array<vec4<f32>, TM>;
                var oa: array<vec4<f32>, TM>;
                for (var i = 0u; i < TM; i++) {
                    qa[i] = sh0[(ty * TM + i) * DSV + dv4];
                    oa[i] = sh0[(BQ + ty * TM + i) * DSV + dv4];
                }
                for (var j = 0u; j < TN; j++) {
                    let kb = sh0[(2u * BQ + tx + TC * j) * DSV + dv4];
                    let vb = sh0[(2u * BQ + BK + tx + TC * j) * DSV + dv4];
                    for (var i = 0u; i < TM; i++) {
                        s[i * TN + j] = dot_acc(qa[i], kb, s[i * TN + j]);
                        dp[i * TN + j] = dot_acc(oa[i], vb, dp[i * TN + j]);
                    }
                }
            }
            workgroupBarrier();
        }
        for (var i = 0u; i < TM; i++) {
            let r = ty * TM + i;
            for (var j = 0u; j < TN; j++) {
                let c = tx + TC * j;
                let p = select(0.0, exp2(s[i * TN + j] * prm.scale_log2 - lse2[i]),
                    visible(row0 + r, key0 + c));
                sh1_set(r * BK + c, p * (dp[i * TN + j] - rd[i]));
            }
        }
        workgroupBarrier();
        // dQ += dS K, K staged PC keys at a time.
        for (var c0 = 0u; c0 < BK; c0 += PC) {
            for (var e = tid; e < PC * D4; e += NT) {
                let c = e / D4;
                var x = vec4<f32>(0.0);
                if (key0 + c0 + c < prm.seq_k) {
                    x = k[k4 + (key0 + c0 + c) * D4 + e % D4];
                }
                sh0[e] = x;
            }
            workgroupBarrier();
            for (var c = 0u; c < PC; c += 4u) {
                var sa: array<vec4<f32>, TM>;
                for (var i = 0u; i < TM; i++) {
                    sa[i] = sh1[((ty * TM + i) * BK + c0 + c) / 4u];
                }
                for (var j = 0u; j < TD4; j++) {
                    let col = tx + TC * j;
                    let k0 = sh0[c * D4 + col];
                    let k1 = sh0[(c + 1u) * D4 + col];
                    let k2 = sh0[(c + 2u) * D4 + col];
                    let k3 = sh0[(c + 3u) * D4 + col];
                    for (var i = 0u; i < TM; i++) {
                        g[i * TD4 + j] = axpy4(sa[i], k0, k1, k2, k3, g[i * TD4 + j]);
                    }
                }
            }
            workgroupBarrier();
        }
    }
    for (var i = 0u; i < TM; i++) {
        let r = row0 + ty * TM + i;
        if (r < prm.seq_q) {
            for (var j = 0u; j < TD4; j++) {
                dq[q4 + r * D4 + tx + TC * j] = g[i * TD4 + j] * prm.scale;
            }
        }
    }
}
