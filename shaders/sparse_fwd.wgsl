// Block-sparse attention forward over selected key blocks, portable f32 (PAPERS.md §1;
// reference: src/reference/sparse.rs). One workgroup per (query token, batch x kv head): the
// tile's rows are the G query heads of the group (they share one selection, as in the papers),
// the key tiles are the selected blocks, BK keys at a time. Causal inside the current block;
// optional additive per-key bias (NOSA). Extra constants: BLK (block size), HAS_BIAS.
//#include "common.wgsl"
//#include "key_bias.wgsl"

@group(0) @binding(0) var<uniform> prm: Params;
@group(0) @binding(1) var<storage, read> q: array<ST>;
@group(0) @binding(2) var<storage, read> k: array<ST>;
@group(0) @binding(3) var<storage, read> v: array<ST>;
@group(0) @binding(4) var<storage, read_write> o: array<ST>;
@group(0) @binding(5) var<storage, read_write> lse: array<f32>;
@group(0) @binding(6) var<storage, read> sel: array<u32>;
//#if HAS_BIAS
@group(0) @binding(7) var<storage, read> bias: array<f32>;
//#endif

const SENTINEL: u32 = 0xffffffffu;

fn fetch(which: u32, g: u32) -> vec4<f32> {
    switch which {
        case 0u: { return unpack_st(q[g]); }
        case 1u: { return unpack_st(k[g]); }
        default: { return unpack_st(v[g]); }
    }
}

var<workgroup> sh_blk: u32;

// -inf, built at run time: a constant -inf is a shader-creation error in WGSL (Chrome's Tint
// rejects it; naga lets it through), so the bits pass through a uniform that is always 0.
fn neg_inf() -> f32 {
    return bitcast<f32>(0xff800000u | (prm.causal & 0u));
}

@compute @workgroup_size(NT)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let t = wg.x;
    let u = wg.y;
    let ty = tid / TC;
    let tx = tid % TC;
    let pos = prm.q_pos0 + t;
    // Keys [0, kv_len) are visible to this token (inside the selected blocks).
    let kv_len = select(prm.seq_k, min(prm.seq_k, pos + 1u), prm.causal != 0u);
    let nb = (prm.seq_k + BLK - 1u) / BLK;
    // Row h of the tile is query head u*G + h at token t; rows are seq_q*D apart.
    let q4 = (prm.q_off + (u * prm.group * prm.seq_q + t) * D) / 4u;
    let qstride = prm.seq_q * D4;
    let k4 = (prm.k_off + u * prm.seq_k * D) / 4u;
    let sel0 = prm.i_off + (u * prm.seq_q + t) * prm.nsel;

    var m: Rows;
    var l: Rows;
    var acc: Acc;
    online_init(&m, &l, &acc);
    for (var si = 0u; si < prm.nsel; si++) {
        if (tid == 0u) {
            sh_blk = sel[sel0 + si];
        }
        let blk = workgroupUniformLoad(&sh_blk);
        // Sentinels (and anything past the last block) select nothing.
        if (blk >= nb) {
            continue;
        }
        for (var key0 = blk * BLK; key0 < min(blk * BLK + BLK, kv_len); key0 += BK) {
            var s: Logits;
            for (var i = 0u; i < TM * TN; i++) {
                s[i] = 0.0;
            }
            // Q, K and V are staged from registers loaded one step ahead (see chunk_load).
            // (Loading the next tile's first K step during this tile's P V was measured slower
            // on the H100: registers live across the softmax.)
            var qr = strided_load(0u, q4, qstride, prm.group, 0u, tid);
            var kr = chunk_load(1u, k4, key0, kv_len, 0u, tid);
            for (var d0 = 0u; d0 < D4; d0 += DCV) {
                strided_store(0u, &qr, tid);
                chunk_store(BQ, &kr, tid);
                workgroupBarrier();
                if (d0 + DCV < D4) {
                    qr = strided_load(0u, q4, qstride, prm.group, d0 + DCV, tid);
                    kr = chunk_load(1u, k4, key0, kv_len, d0 + DCV, tid);
                }
                logits_acc(&s, 0u, BQ, ty, tx);
                workgroupBarrier();
            }
            for (var j = 0u; j < TN; j++) {
                let c = key0 + tx + TC * j;
                // Masked below where c >= kv_len.
                let b = key_bias(u, c);
                for (var i = 0u; i < TM; i++) {
                    s[i * TN + j] = select(NEG, fma(s[i * TN + j], prm.scale_log2, b), c < kv_len);
                }
            }
            var vr = rows_load(2u, k4, key0, kv_len, tid);
            online_softmax(&m, &l, &acc, &s, ty, tx);
            rows_product(&acc, &vr, 2u, k4, key0, kv_len, tid, ty, tx);
        }
    }

    online_totals(&l, ty, tx);
    for (var i = 0u; i < TM; i++) {
        let h = ty * TM + i;
        if (h < prm.group) {
            let lt = row_sum(h);
            // A row whose selection holds no visible key: O = 0, LSE = -inf.
            let inv = select(0.0, 1.0 / lt, lt > 0.0);
            for (var j = 0u; j < TD4; j++) {
                o[q4 + h * qstride + tx + TC * j] = pack_st(acc[i * TD4 + j] * inv);
            }
            if (tx == 0u) {
                lse[prm.r_off + (u * prm.group + h) * prm.seq_q + t] =
                    select(neg_inf(), (m[i] + log2(lt)) * LN2, lt > 0.0);
            }
        }
    }
}
