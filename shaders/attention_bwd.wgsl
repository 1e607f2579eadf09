// Full attention backward (FlashAttention-2 style recomputation), portable f32. Three entries:
//   rowdot: D_i = dO_i · O_i                       (one thread per query row)
//   dkdv:   per key tile, loop over the G query heads of the group and the query tiles:
//           Pᵀ = exp(s·K Qᵀ − LSE), dPᵀ = V dOᵀ, dSᵀ = Pᵀ ∘ (dPᵀ − D),
//           dV += Pᵀ dO, dK += s·dSᵀ Q              (GQA sums happen in registers, no atomics)
//   dq:     per query tile, loop over key tiles: P, dP = dO Vᵀ, dS, dQ += s·dS K
// Thread (ty, tx) owns rows ty*TM.. of the tile's first operand and columns tx + TC*j.
//#include "common.wgsl"

@group(0) @binding(0) var<uniform> prm: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> k: array<f32>;
@group(0) @binding(3) var<storage, read> v: array<f32>;
@group(0) @binding(4) var<storage, read> o: array<f32>;
@group(0) @binding(5) var<storage, read> d_o: array<f32>;
@group(0) @binding(6) var<storage, read> lse: array<f32>;
@group(0) @binding(7) var<storage, read_write> rowd: array<f32>;
@group(0) @binding(8) var<storage, read_write> dq: array<f32>;
@group(0) @binding(9) var<storage, read_write> dk: array<f32>;
@group(0) @binding(10) var<storage, read_write> dv: array<f32>;

// Sizes come from the launcher per entry point (each pipeline has its own constants).
// dkdv: sh1 = Pᵀ [BK][BQ]; sh2 = dSᵀ [BK][BQ] then LSE·log2(e) [BQ] and D [BQ].
// dq: sh1 = dS [BQ][BK]; sh2 unused (size 1).
var<workgroup> sh0: array<f32, SH0>;
var<workgroup> sh1: array<f32, SH1>;
var<workgroup> sh2: array<f32, SH2>;

// rowdot: NT threads per workgroup, one row each; 2-D grid flattened by grid_x.
@compute @workgroup_size(NT)
fn rowdot(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let row = (wg.y * prm.grid_x + wg.x) * NT + tid;
    if (row >= prm.rows) {
        return;
    }
    let base = prm.q_off + row * D;
    var acc = 0.0;
    for (var c = 0u; c < D; c++) {
        acc = fma(d_o[base + c], o[base + c], acc);
    }
    rowd[prm.r_off + row] = acc;
}

// Stage rows [r0, r0+n) x dims [d0, d0+DC) of a q-shaped or kv-shaped tensor into sh0 at `at`
// with row stride DCP; rows past `len` read as zero.
fn stage_q(at: u32, base: u32, r0: u32, n: u32, len: u32, d0: u32, tid: u32, which: u32) {
    for (var e = tid; e < n * DC; e += NT) {
        let r = e / DC;
        let dd = e % DC;
        var x = 0.0;
        if (r0 + r < len) {
            let g = base + (r0 + r) * D + d0 + dd;
            if (which == 0u) { x = q[g]; } else { x = d_o[g]; }
        }
        sh0[at + r * DCP + dd] = x;
    }
}

fn stage_k(at: u32, base: u32, r0: u32, n: u32, len: u32, d0: u32, tid: u32, which: u32) {
    for (var e = tid; e < n * DC; e += NT) {
        let r = e / DC;
        let dd = e % DC;
        var x = 0.0;
        if (r0 + r < len) {
            let g = base + (r0 + r) * D + d0 + dd;
            if (which == 0u) { x = k[g]; } else { x = v[g]; }
        }
        sh0[at + r * DCP + dd] = x;
    }
}

// dkdv: rows are keys (BK = TR*TM), columns are queries (BQ = TC*TN).
@compute @workgroup_size(NT)
fn dkdv(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let key0 = wg.x * BK;
    let kvh = wg.y;
    let k_base = prm.k_off + kvh * prm.seq_k * D;
    let ty = tid / TC;
    let tx = tid % TC;

    var gk: array<f32, TM * TD>;
    var gv: array<f32, TM * TD>;
    for (var i = 0u; i < TM * TD; i++) {
        gk[i] = 0.0;
        gv[i] = 0.0;
    }

    // The first query row that sees key0 (causal): pos(r) = q_pos0 + r >= key0.
    var qstart = 0u;
    if (prm.causal != 0u && key0 > prm.q_pos0) {
        qstart = ((key0 - prm.q_pos0) / BQ) * BQ;
    }
    // sh0 layout in the logit phase: K [BK][DCP] | V [BK][DCP] | Q [BQ][DCP] | dO [BQ][DCP].
    let at_v = BK * DCP;
    let at_q = 2u * BK * DCP;
    let at_do = 2u * BK * DCP + BQ * DCP;
    for (var h = 0u; h < prm.group; h++) {
        let bh = kvh * prm.group + h;
        let q_base = prm.q_off + bh * prm.seq_q * D;
        let r_base = prm.r_off + bh * prm.seq_q;
        for (var row0 = qstart; row0 < prm.seq_q; row0 += BQ) {
            // Per-row LSE (log2 domain) and D of this query tile.
            for (var e = tid; e < BQ; e += NT) {
                var a = 0.0;
                var b = 0.0;
                if (row0 + e < prm.seq_q) {
                    a = lse[r_base + row0 + e] * LOG2E;
                    b = rowd[r_base + row0 + e];
                }
                sh2[BK * BQ + e] = a;
                sh2[BK * BQ + BQ + e] = b;
            }
            var s: array<f32, TM * TN>;
            var dp: array<f32, TM * TN>;
            for (var i = 0u; i < TM * TN; i++) {
                s[i] = 0.0;
                dp[i] = 0.0;
            }
            for (var d0 = 0u; d0 < D; d0 += DC) {
                stage_k(0u, k_base, key0, BK, prm.seq_k, d0, tid, 0u);
                stage_k(at_v, k_base, key0, BK, prm.seq_k, d0, tid, 1u);
                stage_q(at_q, q_base, row0, BQ, prm.seq_q, d0, tid, 0u);
                stage_q(at_do, q_base, row0, BQ, prm.seq_q, d0, tid, 1u);
                workgroupBarrier();
                for (var dd = 0u; dd < DC; dd++) {
                    var ka: array<f32, TM>;
                    var va: array<f32, TM>;
                    for (var i = 0u; i < TM; i++) {
                        ka[i] = sh0[(ty * TM + i) * DCP + dd];
                        va[i] = sh0[at_v + (ty * TM + i) * DCP + dd];
                    }
                    for (var j = 0u; j < TN; j++) {
                        let qb = sh0[at_q + (tx + TC * j) * DCP + dd];
                        let ob = sh0[at_do + (tx + TC * j) * DCP + dd];
                        for (var i = 0u; i < TM; i++) {
                            s[i * TN + j] = fma(ka[i], qb, s[i * TN + j]);
                            dp[i * TN + j] = fma(va[i], ob, dp[i * TN + j]);
                        }
                    }
                }
                workgroupBarrier();
            }
            // Pᵀ and dSᵀ into sh1 / sh2 ([BK][BQ] each).
            for (var i = 0u; i < TM; i++) {
                let c = key0 + ty * TM + i;
                for (var j = 0u; j < TN; j++) {
                    let r = tx + TC * j;
                    let pos = prm.q_pos0 + row0 + r;
                    let ok = c < prm.seq_k && row0 + r < prm.seq_q
                        && (prm.causal == 0u || c <= pos);
                    let p = select(0.0,
                        exp2(s[i * TN + j] * prm.scale_log2 - sh2[BK * BQ + r]), ok);
                    let ds = p * (dp[i * TN + j] - sh2[BK * BQ + BQ + r]);
                    sh1[(ty * TM + i) * BQ + r] = p;
                    sh2[(ty * TM + i) * BQ + r] = ds;
                }
            }
            workgroupBarrier();
            // dV += Pᵀ dO, dK += dSᵀ Q; dO and Q staged PC rows at a time: dO [PC][D] | Q [PC][D].
            for (var r0 = 0u; r0 < BQ; r0 += PC) {
                for (var e = tid; e < PC * D; e += NT) {
                    let r = e / D;
                    let dd = e % D;
                    var a = 0.0;
                    var b = 0.0;
                    if (row0 + r0 + r < prm.seq_q) {
                        let g = q_base + (row0 + r0 + r) * D + dd;
                        a = d_o[g];
                        b = q[g];
                    }
                    sh0[r * D + dd] = a;
                    sh0[PC * D + r * D + dd] = b;
                }
                workgroupBarrier();
                for (var r = 0u; r < PC; r++) {
                    var pa: array<f32, TM>;
                    var sa: array<f32, TM>;
                    for (var i = 0u; i < TM; i++) {
                        pa[i] = sh1[(ty * TM + i) * BQ + r0 + r];
                        sa[i] = sh2[(ty * TM + i) * BQ + r0 + r];
                    }
                    for (var j = 0u; j < TD; j++) {
                        let ob = sh0[r * D + tx + TC * j];
                        let qb = sh0[PC * D + r * D + tx + TC * j];
                        for (var i = 0u; i < TM; i++) {
                            gv[i * TD + j] = fma(pa[i], ob, gv[i * TD + j]);
                            gk[i * TD + j] = fma(sa[i], qb, gk[i * TD + j]);
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
            for (var j = 0u; j < TD; j++) {
                let g = k_base + c * D + tx + TC * j;
                dk[g] = gk[i * TD + j] * prm.scale;
                dv[g] = gv[i * TD + j];
            }
        }
    }
}

// dq: rows are queries (BQ = TR*TM), columns are keys (BK = TC*TN).
@compute @workgroup_size(NT)
fn dq_main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let row0 = wg.x * BQ;
    let bh = wg.y;
    let kvh = bh / prm.group;
    let q_base = prm.q_off + bh * prm.seq_q * D;
    let k_base = prm.k_off + kvh * prm.seq_k * D;
    let r_base = prm.r_off + bh * prm.seq_q;
    let ty = tid / TC;
    let tx = tid % TC;

    var lse2: array<f32, TM>;
    var rd: array<f32, TM>;
    var g: array<f32, TM * TD>;
    for (var i = 0u; i < TM; i++) {
        let r = row0 + ty * TM + i;
        lse2[i] = 0.0;
        rd[i] = 0.0;
        if (r < prm.seq_q) {
            lse2[i] = lse[r_base + r] * LOG2E;
            rd[i] = rowd[r_base + r];
        }
    }
    for (var i = 0u; i < TM * TD; i++) {
        g[i] = 0.0;
    }
    var kend = prm.seq_k;
    if (prm.causal != 0u) {
        kend = min(prm.seq_k, prm.q_pos0 + min(row0 + BQ, prm.seq_q));
    }
    // sh0 layout in the logit phase: Q [BQ][DCP] | dO [BQ][DCP] | K [BK][DCP] | V [BK][DCP].
    let at_do = BQ * DCP;
    let at_k = 2u * BQ * DCP;
    let at_v = 2u * BQ * DCP + BK * DCP;
    for (var key0 = 0u; key0 < kend; key0 += BK) {
        var s: array<f32, TM * TN>;
        var dp: array<f32, TM * TN>;
        for (var i = 0u; i < TM * TN; i++) {
            s[i] = 0.0;
            dp[i] = 0.0;
        }
        for (var d0 = 0u; d0 < D; d0 += DC) {
            stage_q(0u, q_base, row0, BQ, prm.seq_q, d0, tid, 0u);
            stage_q(at_do, q_base, row0, BQ, prm.seq_q, d0, tid, 1u);
            stage_k(at_k, k_base, key0, BK, prm.seq_k, d0, tid, 0u);
            stage_k(at_v, k_base, key0, BK, prm.seq_k, d0, tid, 1u);
            workgroupBarrier();
            for (var dd = 0u; dd < DC; dd++) {
                var qa: array<f32, TM>;
                var oa: array<f32, TM>;
                for (var i = 0u; i < TM; i++) {
                    qa[i] = sh0[(ty * TM + i) * DCP + dd];
                    oa[i] = sh0[at_do + (ty * TM + i) * DCP + dd];
                }
                for (var j = 0u; j < TN; j++) {
                    let kb = sh0[at_k + (tx + TC * j) * DCP + dd];
                    let vb = sh0[at_v + (tx + TC * j) * DCP + dd];
                    for (var i = 0u; i < TM; i++) {
                        s[i * TN + j] = fma(qa[i], kb, s[i * TN + j]);
                        dp[i * TN + j] = fma(oa[i], vb, dp[i * TN + j]);
                    }
                }
            }
            workgroupBarrier();
        }
        for (var i = 0u; i < TM; i++) {
            let pos = prm.q_pos0 + row0 + ty * TM + i;
            for (var j = 0u; j < TN; j++) {
                let c = key0 + tx + TC * j;
                let ok = c < prm.seq_k && (prm.causal == 0u || c <= pos);
                let p = select(0.0, exp2(s[i * TN + j] * prm.scale_log2 - lse2[i]), ok);
                sh1[(ty * TM + i) * BK + tx + TC * j] = p * (dp[i * TN + j] - rd[i]);
            }
        }
        workgroupBarrier();
        // dQ += dS K, K staged PC keys at a time.
        for (var c0 = 0u; c0 < BK; c0 += PC) {
            for (var e = tid; e < PC * D; e += NT) {
                let c = e / D;
                let dd = e % D;
                var x = 0.0;
                if (key0 + c0 + c < prm.seq_k) {
                    x = k[k_base + (key0 + c0 + c) * D + dd];
                }
                sh0[c * D + dd] = x;
            }
            workgroupBarrier();
            for (var c = 0u; c < PC; c++) {
                var sa: array<f32, TM>;
                for (var i = 0u; i < TM; i++) {
                    sa[i] = sh1[(ty * TM + i) * BK + c0 + c];
                }
                for (var j = 0u; j < TD; j++) {
                    let kb = sh0[c * D + tx + TC * j];
                    for (var i = 0u; i < TM; i++) {
                        g[i * TD + j] = fma(sa[i], kb, g[i * TD + j]);
                    }
                }
            }
            workgroupBarrier();
        }
    }
    for (var i = 0u; i < TM; i++) {
        let r = row0 + ty * TM + i;
        if (r < prm.seq_q) {
            for (var j = 0u; j < TD; j++) {
                dq[q_base + r * D + tx + TC * j] = g[i * TD + j] * prm.scale;
            }
        }
    }
}
