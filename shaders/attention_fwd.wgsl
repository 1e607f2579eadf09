// Tiled full attention forward (FlashAttention-2 style), portable f32.
// One workgroup per (query tile of BQ rows, batch x query head). Thread (ty, tx) owns rows
// ty*TM.. of the tile, logit columns tx + TC*j and output vec4 columns tx + TC*j.
// Per key tile: S = Q Kᵀ over chunks of DC dims staged in sh0, then `online_tile` (common.wgsl):
// online softmax, P to sh1, O = alpha*O + P V over chunks of PC keys.
// With HAS_BIAS, an additive per-key bias [b, hkv, seq_k] (f32) joins the scaled logits.
//#include "common.wgsl"
//#include "key_bias.wgsl"

@group(0) @binding(0) var<uniform> prm: Params;
@group(0) @binding(1) var<storage, read> q: array<ST>;
@group(0) @binding(2) var<storage, read> k: array<ST>;
@group(0) @binding(3) var<storage, read> v: array<ST>;
@group(0) @binding(4) var<storage, read_write> o: array<ST>;
@group(0) @binding(5) var<storage, read_write> lse: array<f32>;
//#if HAS_BIAS
@group(0) @binding(6) var<storage, read> bias: array<f32>;
//#endif

fn fetch(which: u32, g: u32) -> vec4<f32> {
    switch which {
        case 0u: { return unpack_st(q[g]); }
        case 1u: { return unpack_st(k[g]); }
        default: { return unpack_st(v[g]); }
    }
}

// sh0: Q chunk [BQ][DSV] | K chunk [BK][DSV]; then row-max partials [BQ][TC] (scalars);
//      then a V chunk [PC][D4].
// sh1: probabilities P [BQ][BK] (scalars, read back as vec4 over 4 keys).

@compute @workgroup_size(NT)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let row0 = wg.x * BQ;
    let bh = wg.y;
    let kvh = bh / prm.group;
    let q4 = (prm.q_off + bh * prm.seq_q * D) / 4u;
    let k4 = (prm.k_off + kvh * prm.seq_k * D) / 4u;
    let ty = tid / TC;
    let tx = tid % TC;

    var m: Rows;
    var l: Rows;
    var acc: Acc;
    online_init(&m, &l, &acc);

    let kend = key_end(row0);
    for (var key0 = 0u; key0 < kend; key0 += BK) {
        var s: Logits;
        for (var i = 0u; i < TM * TN; i++) {
            s[i] = 0.0;
        }
        for (var d0 = 0u; d0 < D4; d0 += DCV) {
            stage_chunk(0u, 0u, q4, row0, BQ, prm.seq_q, d0, tid);
            stage_chunk(1u, BQ, k4, key0, BK, prm.seq_k, d0, tid);
            workgroupBarrier();
            logits_acc(&s, 0u, BQ, ty, tx);
            workgroupBarrier();
        }

        for (var j = 0u; j < TN; j++) {
            let c = key0 + tx + TC * j;
            let b = key_bias(kvh, c);
            for (var i = 0u; i < TM; i++) {
                s[i * TN + j] = select(NEG, fma(s[i * TN + j], prm.scale_log2, b),
                    visible(row0 + ty * TM + i, c));
            }
        }
        online_tile(&m, &l, &acc, &s, 2u, k4, key0, prm.seq_k, tid, ty, tx);
    }

    online_totals(&l, ty, tx);
    for (var i = 0u; i < TM; i++) {
        let r = row0 + ty * TM + i;
        if (r < prm.seq_q) {
            let lt = row_sum(ty * TM + i);
            let inv = 1.0 / lt;
            for (var j = 0u; j < TD4; j++) {
                o[q4 + r * D4 + tx + TC * j] = pack_st(acc[i * TD4 + j] * inv);
            }
            if (tx == 0u) {
                lse[prm.r_off + bh * prm.seq_q + r] = (m[i] + log2(lt)) * LN2;
            }
        }
    }
}
