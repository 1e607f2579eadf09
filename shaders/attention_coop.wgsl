// Full attention forward on cooperative matrices (tensor cores): f16 q, k, v, o; f32 softmax
// state and accumulators. Needs SHADER_F16, EXPERIMENTAL_COOPERATIVE_MATRIX with 16x16x16
// f16 x f16 -> f32, and subgroups of exactly 32 lanes (src/ops/coop.rs checks all three).
//
// One workgroup per (query tile of BQ = 16·NSG rows, batch x query head); subgroup `sg` owns
// query rows sg·16 .. sg·16+15 of the tile and keeps their Q fragments in registers for the
// whole kernel. Per key tile of BK keys (K and V staged in workgroup memory by all threads):
//   S = Q Kᵀ          D/16 cooperative multiply-adds per 16-key chunk, stored to the
//                     subgroup's scratch (16 x BK f32)
//   softmax           lane l owns row l/2 and half l%2 of the tile's columns; P goes to
//                     workgroup memory as f16 and comes back as A matrices
//   O += P V          BK/16 x D/16 multiply-adds into the subgroup's D/16 output matrices
// Cooperative matrices cannot be scaled row by row: every tile the output matrices go through
// the scratch to be multiplied by their rows' alpha. The running maximum is lazy (a row keeps a
// stale maximum until a tile exceeds it by more than RESCALE, log2 units) so that P <= 2^RESCALE
// fits f16 and alpha is usually 1; the result is exact either way (l and O share the maximum).
//
// Written around what the H100's Vulkan driver (580.159) computes correctly: with a
// `workgroupUniformLoad` anywhere in the module every cooperative product came out zero, so
// the rescale is unconditional rather than skipped by a workgroup-uniform flag; the two lanes
// of a row exchange values through workgroup memory, and barriers are workgroup-wide
// (subgroupBarrier needs SUBGROUP_BARRIER). How this was narrowed down: docs/BENCHMARKS.md.
//
// Constants: D (head dim, multiple of 16), BQ, BK (multiple of 16), NSG, NT = 32·NSG,
// DP = D + 8 (staged row stride in halves: rows 16 bytes apart in bank space).
//#include "attn_params.wgsl"
enable wgpu_cooperative_matrix;

@group(0) @binding(0) var<uniform> prm: Params;
@group(0) @binding(1) var<storage, read> q: array<ST>;
@group(0) @binding(2) var<storage, read> k: array<ST>;
@group(0) @binding(3) var<storage, read> v: array<ST>;
@group(0) @binding(4) var<storage, read_write> o: array<ST>;
@group(0) @binding(5) var<storage, read_write> lse: array<f32>;

const RESCALE: f32 = 8.0;
const DQ: u32 = D / 16u;
const STAGE_ROWS: u32 = max(BQ, 2u * BK);

alias MatA = coop_mat16x16<f16, A>;
alias MatB = coop_mat16x16<f16, B>;
alias MatC = coop_mat16x16<f32, C>;

// K tile rows [0, BK) then V tile rows [BK, 2·BK), stride DP; the Q tile before the first.
var<workgroup> kv: array<f16, STAGE_ROWS * DP>;
// Per subgroup: S of a key tile (16 x BK f32; also the scratch of rescales and the output),
// and P (16 x BK f16).
var<workgroup> scr: array<f32, NSG * 16u * BK>;
var<workgroup> pm: array<f16, NSG * 16u * BK>;
// The two lanes of a row exchange values here (tid ^ 1).
var<workgroup> pair: array<f32, NT>;

fn partner(tid: u32, x: f32) -> f32 {
    pair[tid] = x;
    workgroupBarrier();
    let y = pair[tid ^ 1u];
    workgroupBarrier();
    return y;
}

// Rows [r0, r0 + n) of tensor `t` (0 = q, 1 = k, 2 = v; row stride D, base vec4 index `base4`)
// into staging rows at..at+n; rows at or past `len` are zero.
fn stage(t: u32, at: u32, base4: u32, r0: u32, n: u32, len: u32, tid: u32) {
    for (var e = tid; e < n * D4; e += NT) {
        let r = e / D4;
        let c = e % D4;
        var x = vec4<f16>(0.0);
        if (r0 + r < len) {
            let g = base4 + (r0 + r) * D4 + c;
            switch t {
                case 0u: { x = q[g]; }
                case 1u: { x = k[g]; }
                default: { x = v[g]; }
            }
        }
        let s = (at + r) * DP + c * 4u;
        kv[s] = x.x;
        kv[s + 1u] = x.y;
        kv[s + 2u] = x.z;
        kv[s + 3u] = x.w;
    }
}

@compute @workgroup_size(NT)
fn fwd(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    // Subgroups of 32 (checked on the host) hold consecutive invocations.
    let sg = tid / 32u;
    let lane = tid % 32u;
    let row0 = wg.x * BQ;
    let bh = wg.y;
    let kvh = bh / prm.group;
    let q4 = (prm.q_off + bh * prm.seq_q * D) / 4u;
    let k4 = (prm.k_off + kvh * prm.seq_k * D) / 4u;

    // Q fragments of this subgroup's 16 rows.
    stage(0u, 0u, q4, row0, BQ, prm.seq_q, tid);
    workgroupBarrier();
    var qa: array<MatA, DQ>;
    for (var i = 0u; i < DQ; i++) {
        let at = sg * 16u * DP + i * 16u;
        qa[i] = coopLoadT<MatA>(&kv[at], DP);
    }
    var acc: array<MatC, DQ>;
    // Never written: the zero each S chunk starts from.
    var zero: MatC;
    // Softmax state of the row this lane helps with: lane l owns row l/2 and half l%2 of each
    // tile's columns (the two lanes of a row share m; l is per lane until the end).
    let r = lane / 2u;
    let half = lane % 2u;
    let row = row0 + sg * 16u + r;
    var m = NEG;
    var l = 0.0;
    let sbase = sg * 16u * BK;
    const HB: u32 = BK / 2u;
    // Last key any row of the tile sees: chunks past it are skipped (uniformly).
    var klast = prm.seq_k - 1u;
    if (prm.causal != 0u) {
        klast = min(klast, prm.q_pos0 + min(row0 + BQ, prm.seq_q) - 1u);
    }

    let kend = key_end(row0);
    for (var key0 = 0u; key0 < kend; key0 += BK) {
        workgroupBarrier();
        stage(1u, 0u, k4, key0, BK, prm.seq_k, tid);
        stage(2u, BK, k4, key0, BK, prm.seq_k, tid);
        workgroupBarrier();
        let nj = min(BK, klast + 1u - key0);
        for (var j = 0u; j < nj; j += 16u) {
            var s = zero;
            for (var i = 0u; i < DQ; i++) {
                let at = j * DP + i * 16u;
                let kb = coopLoad<MatB>(&kv[at], DP);
                s = coopMultiplyAdd(qa[i], kb, s);
            }
            let at = sbase + j;
            coopStoreT(s, &scr[at], BK);
        }
        workgroupBarrier();

        var x: array<f32, HB>;
        var mx = NEG;
        for (var c = 0u; c < HB; c++) {
            let key = key0 + half * HB + c;
            let sv = scr[sbase + r * BK + half * HB + c];
            x[c] = select(NEG, sv * prm.scale_log2, visible(row, key));
            mx = max(mx, x[c]);
        }
        mx = max(mx, partner(tid, mx));
        var alpha = 1.0;
        if (mx > m + RESCALE) {
            if (m != NEG) {
                alpha = exp2(m - mx);
            }
            m = mx;
        }
        l *= alpha;
        for (var c = 0u; c < HB; c++) {
            let p = select(0.0, exp2(x[c] - m), x[c] != NEG);
            l += p;
            pm[sbase + r * BK + half * HB + c] = f16(p);
        }
        // Bring the output rows to their (possibly new) maxima; alpha = 1 where unchanged.
        for (var i = 0u; i < DQ; i++) {
            coopStoreT(acc[i], &scr[sbase], 16u);
            workgroupBarrier();
            for (var c = 0u; c < 8u; c++) {
                scr[sbase + r * 16u + half * 8u + c] *= alpha;
            }
            workgroupBarrier();
            acc[i] = coopLoadT<MatC>(&scr[sbase], 16u);
            workgroupBarrier();
        }
        workgroupBarrier();
        for (var j = 0u; j < nj; j += 16u) {
            let pat = sbase + j;
            let pa = coopLoadT<MatA>(&pm[pat], BK);
            for (var i = 0u; i < DQ; i++) {
                let at = (BK + j) * DP + i * 16u;
                let vb = coopLoadT<MatB>(&kv[at], DP);
                acc[i] = coopMultiplyAdd(pa, vb, acc[i]);
            }
        }
    }

    // O = acc / l, through the scratch a 16x16 block at a time.
    let lt = l + partner(tid, l);
    let inv = 1.0 / lt;
    for (var i = 0u; i < DQ; i++) {
        workgroupBarrier();
        coopStoreT(acc[i], &scr[sbase], 16u);
        workgroupBarrier();
        if (row < prm.seq_q) {
            let at = sbase + r * 16u + half * 8u;
            let g = q4 + row * D4 + i * 4u + half * 2u;
            o[g] = pack_st(vec4<f32>(scr[at], scr[at + 1u], scr[at + 2u], scr[at + 3u]) * inv);
            o[g + 1u] = pack_st(vec4<f32>(scr[at + 4u], scr[at + 5u], scr[at + 6u], scr[at + 7u]) * inv);
        }
    }
    if (row < prm.seq_q && half == 0u) {
        lse[prm.r_off + bh * prm.seq_q + row] = (m + log2(lt)) * LN2;
    }
}
