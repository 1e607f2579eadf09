// Block-sparse attention backward, portable f32 (reference: src/reference/sparse.rs, gradients
// by the chain rule as in src/reference/attention.rs). D = rowsum(dO ∘ O) comes from the dense
// `rowdot` entry. Two entries:
//   dq_main: per (token, batch x kv head): rows = the G query heads of the token, loop over its
//            selected blocks: P, dP = dO Vᵀ, dS = P ∘ (dP − D), dQ += s·dS K.
//   dkdv:    per (key block, batch x kv head): rows = the block's keys, columns = the G heads
//            of BQ / G tokens that selected the block (found by scanning the selection and
//            compacted in token order: deterministic, no atomics): Pᵀ, dPᵀ, dSᵀ,
//            dV += Pᵀ dO, dK += s·dSᵀ Q, and with a bias d bias_j = Σ dSᵀ_j· (registers,
//            then a fixed-order sum over the row's threads: the workgroup owns its keys).
// Extra constants: BLK (block size), HAS_BIAS.
//#include "common.wgsl"
//#include "key_bias.wgsl"
//#include "token_line.wgsl"

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

const SENTINEL: u32 = 0xffffffffu;

fn fetch(which: u32, g: u32) -> vec4<f32> {
    switch which {
        case 0u: { return unpack_st(q[g]); }
        case 1u: { return unpack_st(d_o[g]); }
        case 2u: { return unpack_st(k[g]); }
        default: { return unpack_st(v[g]); }
    }
}

var<workgroup> sh_u: u32;

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
            // Staged from registers loaded one step ahead (see chunk_load in common.wgsl).
            var qr = strided_load(0u, q4, qstride, prm.group, 0u, tid);
            var dr = strided_load(1u, q4, qstride, prm.group, 0u, tid);
            var kr = chunk_load(2u, k4, key0, kv_len, 0u, tid);
            var vr = chunk_load(3u, k4, key0, kv_len, 0u, tid);
            for (var d0 = 0u; d0 < D4; d0 += DCV) {
                strided_store(0u, &qr, tid);
                strided_store(BQ, &dr, tid);
                chunk_store(2u * BQ, &kr, tid);
                chunk_store(2u * BQ + BK, &vr, tid);
                workgroupBarrier();
                if (d0 + DCV < D4) {
                    qr = strided_load(0u, q4, qstride, prm.group, d0 + DCV, tid);
                    dr = strided_load(1u, q4, qstride, prm.group, d0 + DCV, tid);
                    kr = chunk_load(2u, k4, key0, kv_len, d0 + DCV, tid);
                    vr = chunk_load(3u, k4, key0, kv_len, d0 + DCV, tid);
                }
                logits_acc(&s, 0u, 2u * BQ, ty, tx);
                logits_acc(&dp, BQ, 2u * BQ + BK, ty, tx);
                workgroupBarrier();
            }
            for (var j = 0u; j < TN; j++) {
                let c = key0 + tx + TC * j;
                let b = key_bias(u, c);
                for (var i = 0u; i < TM; i++) {
                    let h = ty * TM + i;
                    let p = select(0.0, exp2(fma(s[i * TN + j], prm.scale_log2, b) - lse2[i]),
                        c < kv_len && h < prm.group);
                    sh1_set(h * BK + tx + TC * j, p * (dp[i * TN + j] - rd[i]));
                }
            }
            var kx = rows_load(2u, k4, key0, kv_len, tid);
            workgroupBarrier();
            rows_product(&g, &kx, 2u, k4, key0, kv_len, tid, ty, tx);
        }
    }
    for (var i = 0u; i < TM; i++) {
        let h = ty * TM + i;
        if (h < prm.group) {
            for (var j = 0u; j < TD4; j++) {
                dq[q4 + h * qstride + tx + TC * j] = pack_st(g[i * TD4 + j] * prm.scale);
            }
        }
    }
}

// dkdv: rows are the BK = BLK keys of block wg.x; columns are (token, head) pairs: BQ / G tokens
// that selected the block, all G heads of each. The tokens are found by scanning the selection
// NT tokens at a time and compacted in token order (a prefix sum), so the sums always run in
// the same order: deterministic, no atomics.
var<workgroup> sh_list: array<u32, NT + BQ>;  // tokens waiting for a tile, in order
var<workgroup> sh_col: array<u32, BQ>;        // q / dO vec4 base of each column, or SENTINEL
var<workgroup> sh_kvl: array<u32, BQ>;        // keys visible to each column's token (0: padding)

// Columns of head dims [d0v, d0v + DCV) of tensor `which` (q or dO) into sh0 rows at...
fn stage_cols(which: u32, at: u32, d0v: u32, tid: u32) {
    for (var e = tid; e < BQ * DCV; e += NT) {
        let r = e / DCV;
        let base = sh_col[r];
        var x = vec4<f32>(0.0);
        if (base != SENTINEL) {
            x = fetch(which, base + d0v + e % DCV);
        }
        sh0[(at + r) * DSV + e % DCV] = x;
    }
}

// PC whole columns [r0, r0 + PC) of tensor `which` into sh0 at vec4 offset `at` (stride D4).
fn stage_col_rows(which: u32, at: u32, r0: u32, tid: u32) {
    for (var e = tid; e < PC * D4; e += NT) {
        let base = sh_col[r0 + e / D4];
        var x = vec4<f32>(0.0);
        if (base != SENTINEL) {
            x = fetch(which, base + e % D4);
        }
        sh0[at + e] = x;
    }
}

// One tile: the tokens sh_list[first .. first + count) (count <= BQ / G) against the block.
fn dkdv_tile(gk: ptr<function, Acc>, gv: ptr<function, Acc>, db: ptr<function, Rows>, u: u32,
             k4: u32, key0: u32, first: u32, count: u32, tid: u32, ty: u32, tx: u32) {
    for (var c = tid; c < BQ; c += NT) {
        let li = c / prm.group;
        var base = SENTINEL;
        var kvl = 0u;
        var a = 0.0;
        var b = 0.0;
        if (li < count) {
            let t = sh_list[first + li];
            let hq = u * prm.group + c % prm.group;
            base = (prm.q_off + (hq * prm.seq_q + t) * D) / 4u;
            kvl = kv_len_of(t);
            let row = prm.r_off + hq * prm.seq_q + t;
            a = lse[row] * LOG2E;
            b = rowd[row];
        }
        sh_col[c] = base;
        sh_kvl[c] = kvl;
        sh2_set(BK * BQ + c, a);
        sh2_set(BK * BQ + BQ + c, b);
    }
    workgroupBarrier();
    var s: Logits;
    var dp: Logits;
    for (var i = 0u; i < TM * TN; i++) {
        s[i] = 0.0;
        dp[i] = 0.0;
    }
    for (var d0 = 0u; d0 < D4; d0 += DCV) {
        stage_chunk(2u, 0u, k4, key0, BK, prm.seq_k, d0, tid);
        stage_chunk(3u, BK, k4, key0, BK, prm.seq_k, d0, tid);
        stage_cols(0u, 2u * BK, d0, tid);
        stage_cols(1u, 2u * BK + BQ, d0, tid);
        workgroupBarrier();
        logits_acc(&s, 0u, 2u * BK, ty, tx);
        logits_acc(&dp, BK, 2u * BK + BQ, ty, tx);
        workgroupBarrier();
    }
    for (var i = 0u; i < TM; i++) {
        let c = key0 + ty * TM + i;
        let b = key_bias(u, c);
        for (var j = 0u; j < TN; j++) {
            let col = tx + TC * j;
            let p = select(0.0,
                exp2(fma(s[i * TN + j], prm.scale_log2, b) - sh2_get(BK * BQ + col)),
                c < sh_kvl[col]);
            let ds = p * (dp[i * TN + j] - sh2_get(BK * BQ + BQ + col));
            sh1_set((ty * TM + i) * BQ + col, p);
            sh2_set((ty * TM + i) * BQ + col, ds);
            (*db)[i] += ds;
        }
    }
    workgroupBarrier();
    for (var r0 = 0u; r0 < BQ; r0 += PC) {
        stage_col_rows(1u, 0u, r0, tid);
        stage_col_rows(0u, PC * D4, r0, tid);
        workgroupBarrier();
        rows_acc(gv, 1u, BQ, r0, 0u, ty, tx);
        rows_acc(gk, 2u, BQ, r0, PC * D4, ty, tx);
        workgroupBarrier();
    }
}

@compute @workgroup_size(NT)
fn dkdv(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let blk = wg.x;
    let u = wg.y;
    let key0 = blk * BLK;
    let ty = tid / TC;
    let tx = tid % TC;
    let k4 = (prm.k_off + u * prm.seq_k * D) / 4u;
    let tpt = BQ / prm.group;

    var gk: Acc;
    var gv: Acc;
    var db: Rows;
    for (var i = 0u; i < TM * TD4; i++) {
        gk[i] = vec4<f32>(0.0);
        gv[i] = vec4<f32>(0.0);
    }
    for (var i = 0u; i < TM; i++) {
        db[i] = 0.0;
    }
    let tstart = line_start(key0, tid);
    for (var t0 = tstart; t0 < prm.seq_q; t0 += NT) {
        let n = line_append(t0, u, blk, tid);
        var done = 0u;
        while (n - done >= tpt) {
            dkdv_tile(&gk, &gv, &db, u, k4, key0, done, tpt, tid, ty, tx);
            done += tpt;
        }
        line_keep(done, n, tid);
    }
    let rem = line_waiting();
    if (rem > 0u) {
        dkdv_tile(&gk, &gv, &db, u, k4, key0, 0u, rem, tid, ty, tx);
    }
    for (var i = 0u; i < TM; i++) {
        let c = key0 + ty * TM + i;
        if (c < prm.seq_k) {
            for (var j = 0u; j < TD4; j++) {
                let gi = k4 + c * D4 + tx + TC * j;
                dk[gi] = pack_st(gk[i * TD4 + j] * prm.scale);
                dv[gi] = pack_st(gv[i * TD4 + j]);
            }
        }
    }
//#if HAS_BIAS
    // d bias: the row totals of the per-thread partials (common.wgsl, fixed order).
    let db_total = row_totals(&db, ty, tx);
    for (var i = 0u; i < TM; i++) {
        let c = key0 + ty * TM + i;
        if (tx == 0u && c < prm.seq_k) {
            dbias[prm.b_off + u * prm.seq_k + c] = db_total[i];
        }
    }
//#endif
}
