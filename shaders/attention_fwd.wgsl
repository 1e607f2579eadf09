// Tiled full attention forward (FlashAttention-2 style), portable f32.
// One workgroup per (query tile of BQ rows, batch x query head). Thread (ty, tx) owns rows
// ty*TM..ty*TM+TM of the tile, logit columns tx + TC*j and output columns tx + TC*j.
// Per key tile: S = Q Kᵀ accumulated over chunks of DC dims staged in workgroup memory; online
// softmax (row max reduced across the TC threads of a row); O = alpha*O + P V over chunks of PC keys.
//#include "common.wgsl"

@group(0) @binding(0) var<uniform> prm: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> k: array<f32>;
@group(0) @binding(3) var<storage, read> v: array<f32>;
@group(0) @binding(4) var<storage, read_write> o: array<f32>;
@group(0) @binding(5) var<storage, read_write> lse: array<f32>;

// sh_a: phase 1 holds Q chunk [BQ][DCP] then K chunk [BK][DCP]; then the row-max partials
// [BQ][TC]; phase 3 holds a V chunk [PC][D]. sh_p: probabilities [BQ][BK].
var<workgroup> sh_a: array<f32, SH_A>;
var<workgroup> sh_p: array<f32, BQ * BK>;

@compute @workgroup_size(NT)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let row0 = wg.x * BQ;
    let bh = wg.y;
    let kvh = bh / prm.group;
    let q_base = prm.q_off + bh * prm.seq_q * D;
    let k_base = prm.k_off + kvh * prm.seq_k * D;
    let ty = tid / TC;
    let tx = tid % TC;

    var acc: array<f32, TM * TD>;
    var m: array<f32, TM>;
    var l: array<f32, TM>;
    for (var i = 0u; i < TM; i++) {
        m[i] = NEG;
        l[i] = 0.0;
    }
    for (var i = 0u; i < TM * TD; i++) {
        acc[i] = 0.0;
    }

    var kend = prm.seq_k;
    if (prm.causal != 0u) {
        kend = min(prm.seq_k, prm.q_pos0 + min(row0 + BQ, prm.seq_q));
    }
    let ntiles = (kend + BK - 1u) / BK;
    for (var t = 0u; t < ntiles; t++) {
        let key0 = t * BK;
        var s: array<f32, TM * TN>;
        for (var i = 0u; i < TM * TN; i++) {
            s[i] = 0.0;
        }
        for (var d0 = 0u; d0 < D; d0 += DC) {
            for (var e = tid; e < BQ * DC; e += NT) {
                let r = e / DC;
                let dd = e % DC;
                var x = 0.0;
                if (row0 + r < prm.seq_q) {
                    x = q[q_base + (row0 + r) * D + d0 + dd];
                }
                sh_a[r * DCP + dd] = x;
            }
            for (var e = tid; e < BK * DC; e += NT) {
                let c = e / DC;
                let dd = e % DC;
                var x = 0.0;
                if (key0 + c < prm.seq_k) {
                    x = k[k_base + (key0 + c) * D + d0 + dd];
                }
                sh_a[BQ * DCP + c * DCP + dd] = x;
            }
            workgroupBarrier();
            for (var dd = 0u; dd < DC; dd++) {
                var a: array<f32, TM>;
                var b: array<f32, TN>;
                for (var i = 0u; i < TM; i++) {
                    a[i] = sh_a[(ty * TM + i) * DCP + dd];
                }
                for (var j = 0u; j < TN; j++) {
                    b[j] = sh_a[BQ * DCP + (tx + TC * j) * DCP + dd];
                }
                for (var i = 0u; i < TM; i++) {
                    for (var j = 0u; j < TN; j++) {
                        s[i * TN + j] = fma(a[i], b[j], s[i * TN + j]);
                    }
                }
            }
            workgroupBarrier();
        }

        // Scale, mask, and this thread's share of each row max.
        for (var i = 0u; i < TM; i++) {
            let pos = prm.q_pos0 + row0 + ty * TM + i;
            var mx = NEG;
            for (var j = 0u; j < TN; j++) {
                let c = key0 + tx + TC * j;
                let ok = c < prm.seq_k && (prm.causal == 0u || c <= pos);
                let x = select(NEG, s[i * TN + j] * prm.scale_log2, ok);
                s[i * TN + j] = x;
                mx = max(mx, x);
            }
            sh_a[(ty * TM + i) * TC + tx] = mx;
        }
        workgroupBarrier();
        for (var i = 0u; i < TM; i++) {
            var mt = m[i];
            for (var x = 0u; x < TC; x++) {
                mt = max(mt, sh_a[(ty * TM + i) * TC + x]);
            }
            let alpha = exp2(m[i] - mt);
            m[i] = mt;
            var ls = 0.0;
            for (var j = 0u; j < TN; j++) {
                let x = s[i * TN + j];
                let p = select(0.0, exp2(x - mt), x != NEG);
                sh_p[(ty * TM + i) * BK + tx + TC * j] = p;
                ls += p;
            }
            l[i] = l[i] * alpha + ls;
            for (var j = 0u; j < TD; j++) {
                acc[i * TD + j] *= alpha;
            }
        }
        workgroupBarrier();

        // O += P V, V staged PC keys at a time.
        for (var c0 = 0u; c0 < BK; c0 += PC) {
            for (var e = tid; e < PC * D; e += NT) {
                let c = e / D;
                let dd = e % D;
                var x = 0.0;
                if (key0 + c0 + c < prm.seq_k) {
                    x = v[k_base + (key0 + c0 + c) * D + dd];
                }
                sh_a[c * D + dd] = x;
            }
            workgroupBarrier();
            for (var c = 0u; c < PC; c++) {
                var p: array<f32, TM>;
                for (var i = 0u; i < TM; i++) {
                    p[i] = sh_p[(ty * TM + i) * BK + c0 + c];
                }
                for (var j = 0u; j < TD; j++) {
                    let vv = sh_a[c * D + tx + TC * j];
                    for (var i = 0u; i < TM; i++) {
                        acc[i * TD + j] = fma(p[i], vv, acc[i * TD + j]);
                    }
                }
            }
            workgroupBarrier();
        }
    }

    // Row sums: each thread holds the sum over its own columns; add the TC shares.
    for (var i = 0u; i < TM; i++) {
        sh_a[(ty * TM + i) * TC + tx] = l[i];
    }
    workgroupBarrier();
    for (var i = 0u; i < TM; i++) {
        let r = row0 + ty * TM + i;
        if (r < prm.seq_q) {
            var lt = 0.0;
            for (var x = 0u; x < TC; x++) {
                lt += sh_a[(ty * TM + i) * TC + x];
            }
            let inv = 1.0 / lt;
            for (var j = 0u; j < TD; j++) {
                o[q_base + r * D + tx + TC * j] = acc[i * TD + j] * inv;
            }
            if (tx == 0u) {
                lse[prm.r_off + bh * prm.seq_q + r] = (m[i] + log2(lt)) * LN2;
            }
        }
    }
}
