// Tiled full attention forward (FlashAttention-2 style), portable f32.
// One workgroup per (query tile of BQ rows, batch x query head). Thread (ty, tx) owns rows
// ty*TM.. of the tile, logit columns tx + TC*j and output vec4 columns tx + TC*j.
// Per key tile: S = Q Kᵀ over chunks of DC dims staged in sh0; online softmax with the row max
// reduced across the TC threads of a row; P to sh1; O = alpha*O + P V over chunks of PC keys.
//#include "common.wgsl"

@group(0) @binding(0) var<uniform> prm: Params;
@group(0) @binding(1) var<storage, read> q: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> k: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> v: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> o: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> lse: array<f32>;

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

    var acc: array<vec4<f32>, TM * TD4>;
    var m: array<f32, TM>;
    var l: array<f32, TM>;
    for (var i = 0u; i < TM; i++) {
        m[i] = NEG;
        l[i] = 0.0;
    }
    for (var i = 0u; i < TM * TD4; i++) {
        acc[i] = vec4<f32>(0.0);
    }

    let kend = key_end(row0);
    for (var key0 = 0u; key0 < kend; key0 += BK) {
        var s: array<f32, TM * TN>;
        for (var i = 0u; i < TM * TN; i++) {
            s[i] = 0.0;
        }
        for (var d0 = 0u; d0 < D4; d0 += DCV) {
            for (var e = tid; e < BQ * DCV; e += NT) {
                let r = e / DCV;
                var x = vec4<f32>(0.0);
                if (row0 + r < prm.seq_q) {
                    x = q[q4 + (row0 + r) * D4 + d0 + e % DCV];
                }
                sh0[r * DSV + e % DCV] = x;
            }
            for (var e = tid; e < BK * DCV; e += NT) {
                let c = e / DCV;
                var x = vec4<f32>(0.0);
                if (key0 + c < prm.seq_k) {
                    x = k[k4 + (key0 + c) * D4 + d0 + e % DCV];
                }
                sh0[(BQ + c) * DSV + e % DCV] = x;
            }
            workgroupBarrier();
            for (var dv = 0u; dv < DCV; dv++) {
                var a: array<vec4<f32>, TM>;
                for (var i = 0u; i < TM; i++) {
                    a[i] = sh0[(ty * TM + i) * DSV + dv];
                }
                for (var j = 0u; j < TN; j++) {
                    let b = sh0[(BQ + tx + TC * j) * DSV + dv];
                    for (var i = 0u; i < TM; i++) {
                        s[i * TN + j] = dot_acc(a[i], b, s[i * TN + j]);
                    }
                }
            }
            workgroupBarrier();
        }

        // Scale, mask, and this thread's share of each row max.
        for (var i = 0u; i < TM; i++) {
            let r = ty * TM + i;
            var mx = NEG;
            for (var j = 0u; j < TN; j++) {
                let x = select(NEG, s[i * TN + j] * prm.scale_log2,
                    visible(row0 + r, key0 + tx + TC * j));
                s[i * TN + j] = x;
                mx = max(mx, x);
            }
            sh0_set(r * TC + tx, mx);
        }
        workgroupBarrier();
        for (var i = 0u; i < TM; i++) {
            let r = ty * TM + i;
            let mt = row_max(r, m[i]);
            let alpha = exp2(m[i] - mt);
            m[i] = mt;
            var ls = 0.0;
            for (var j = 0u; j < TN; j++) {
                let x = s[i * TN + j];
                let p = select(0.0, exp2(x - mt), x != NEG);
                sh1_set(r * BK + tx + TC * j, p);
                ls += p;
            }
            l[i] = l[i] * alpha + ls;
            for (var j = 0u; j < TD4; j++) {
                acc[i * TD4 + j] *= alpha;
            }
        }
        workgroupBarrier();

        // O += P V, V staged PC keys at a time.
        for (var c0 = 0u; c0 < BK; c0 += PC) {
            for (var e = tid; e < PC * D4; e += NT) {
                let c = e / D4;
                var x = vec4<f32>(0.0);
                if (key0 + c0 + c < prm.seq_k) {
                    x = v[k4 + (key0 + c0 + c) * D4 + e % D4];
                }
                sh0[e] = x;
            }
            workgroupBarrier();
            for (var c = 0u; c < PC; c += 4u) {
                var p: array<vec4<f32>, TM>;
                for (var i = 0u; i < TM; i++) {
                    p[i] = sh1[((ty * TM + i) * BK + c0 + c) / 4u];
                }
                for (var j = 0u; j < TD4; j++) {
                    let col = tx + TC * j;
                    let v0 = sh0[c * D4 + col];
                    let v1 = sh0[(c + 1u) * D4 + col];
                    let v2 = sh0[(c + 2u) * D4 + col];
                    let v3 = sh0[(c + 3u) * D4 + col];
                    for (var i = 0u; i < TM; i++) {
                        acc[i * TD4 + j] = axpy4(p[i], v0, v1, v2, v3, acc[i * TD4 + j]);
                    }
                }
            }
            workgroupBarrier();
        }
    }

    // Row sums: each thread holds the sum over its own columns; add the TC shares.
    for (var i = 0u; i < TM; i++) {
        sh0_set((ty * TM + i) * TC + tx, l[i]);
    }
    workgroupBarrier();
    for (var i = 0u; i < TM; i++) {
        let r = row0 + ty * TM + i;
        if (r < prm.seq_q) {
            let lt = row_sum(ty * TM + i);
            let inv = 1.0 / lt;
            for (var j = 0u; j < TD4; j++) {
                o[q4 + r * D4 + tx + TC * j] = acc[i * TD4 + j] * inv;
            }
            if (tx == 0u) {
                lse[prm.r_off + bh * prm.seq_q + r] = (m[i] + log2(lt)) * LN2;
            }
        }
    }
}
