// Full attention forward on cooperative matrices (tensor cores): f16 q, k, v, o; f32 softmax
// state and accumulators. Needs SHADER_F16, SUBGROUP, EXPERIMENTAL_COOPERATIVE_MATRIX with
// 16x16x16 f16 x f16 -> f32, and subgroups of exactly 32 lanes (src/ops/coop.rs checks them).
//
// One workgroup per (query tile of BQ = 16·NSG rows, batch x query head); subgroup `sg` owns
// query rows sg·16 .. sg·16+15 and keeps their Q fragments in registers. Per key tile of BK keys:
//   S = Q Kᵀ     NJ = BK/16 chunks of D/16 multiply-adds, stored to the subgroup's scratch
//   softmax      lane l owns row l/2 and the columns of parity l%2; P to workgroup memory (f16)
//   O += P V     per 16-column slice of O: a product from zero (NJ multiply-adds) goes through
//                the scratch into the lanes' f32 registers, which carry O for the whole kernel
// Keeping O in registers rather than in cooperative matrices makes the softmax rescale a
// per-lane multiply (a matrix cannot be scaled row by row; the first version sent every output
// matrix through workgroup memory each tile, 44% of its time). The running maximum is lazy (a row
// keeps a stale maximum until a tile exceeds it by more than RESCALE, log2 units) so P <= 2^RESCALE
// fits f16 and the rescale is rare; the result is exact either way (l and O share the maximum).
// K and V tiles are staged in workgroup memory (matrices loaded straight from the storage buffers
// measured 2.2x slower on the H100), the next tile's vec4 loads in flight during this tile's
// products (staging with scalar loads cost 40% of the time). Where the tile allows (PAIRS = 1),
// products are computed two at a time: two independent multiply-add chains share each A
// fragment, which hides the tensor cores' latency (9% at d 128).
//
// Written around what the H100's Vulkan driver (580.159) computes correctly: with a
// `workgroupUniformLoad` anywhere in the module every cooperative product came out zero
// (docs/BENCHMARKS.md). Barriers are workgroup-wide (subgroupBarrier needs SUBGROUP_BARRIER).
// naga requires cooperative loads in uniform control flow, so their loops have constant bounds.
//
// Constants: D (head dim, multiple of 16), BQ, BK (multiple of 16), NSG, NT = 32·NSG,
// DP = D + 8 (staged f16 row stride: rows 16 bytes apart in bank space), OW (16-column slices of
// O per round through the scratch; divides D/16 and BK/16), KV (staging halves: 2·BK·DP, or the
// Q tile if larger), PAIRS (NJ and OW even). Storage is native f16 (ST = vec4<f16>).
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
const NJ: u32 = BK / 16u;
// Columns of a BK-wide tile per lane, and f32 / f16 scratch row strides (16-byte multiples,
// offset so the 16 rows of a column do not share a bank).
const HB: u32 = BK / 2u;
const SP: u32 = BK + 4u;
const PP: u32 = BK + 8u;
// vec4s of a K (and of a V) tile each thread carries from global memory to the staging area.
const NPF: u32 = (BK * D4 + NT - 1u) / NT;

alias MatA = coop_mat16x16<f16, A>;
alias MatB = coop_mat16x16<f16, B>;
alias MatC = coop_mat16x16<f32, C>;

// K tile rows [0, BK) then V tile rows [BK, 2·BK); the Q tile before the first.
var<workgroup> kv: array<f16, KV>;
// Per subgroup: S of a key tile, then the slices of P·V (16 x BK f32), and P (16 x BK f16).
var<workgroup> scr: array<f32, NSG * 16u * SP>;
var<workgroup> pm: array<f16, NSG * 16u * PP>;

// Four halves into the staging area at `at`.
fn put4(at: u32, x: ST) {
    kv[at] = x.x;
    kv[at + 1u] = x.y;
    kv[at + 2u] = x.z;
    kv[at + 3u] = x.w;
}

// K and V rows [r0, r0 + BK) of the head at vec4 index `k4` into this thread's registers;
// rows at or past `end` are zero.
fn fetch(pk: ptr<function, array<ST, NPF>>, pv: ptr<function, array<ST, NPF>>, k4: u32,
         r0: u32, end: u32, tid: u32) {
    for (var i = 0u; i < NPF; i++) {
        let e = tid + i * NT;
        let r = r0 + e / D4;
        var a = ST(0.0);
        var b = ST(0.0);
        if (e < BK * D4 && r < end) {
            let g = k4 + r * D4 + e % D4;
            a = k[g];
            b = v[g];
        }
        (*pk)[i] = a;
        (*pv)[i] = b;
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

    for (var e = tid; e < BQ * D4; e += NT) {
        let r = e / D4;
        var x = ST(0.0);
        if (row0 + r < prm.seq_q) {
            x = q[q4 + (row0 + r) * D4 + e % D4];
        }
        put4(r * DP + (e % D4) * 4u, x);
    }
    workgroupBarrier();
    var qa: array<MatA, DQ>;
    for (var i = 0u; i < DQ; i++) {
        qa[i] = coopLoadT<MatA>(&kv[sg * 16u * DP + i * 16u], DP);
    }

    // Lane l: row l/2 of the subgroup's 16, columns of parity l%2 (the two lanes of a row share
    // m; l is per lane until the end). `acc` holds this lane's D/2 columns of O.
    let r = lane / 2u;
    let half = lane % 2u;
    let row = row0 + sg * 16u + r;
    var m = NEG;
    var l = 0.0;
    var acc: array<f32, D / 2u>;
    let sb = sg * 16u * SP;
    let pb = sg * 16u * PP;
    // Never written: the zero each product starts from.
    var zero: MatC;

    // The next K/V tile travels through registers while this one is multiplied. Keys at or past
    // kend (never visible to this query tile) are zero.
    let kend = key_end(row0);
    var pk: array<ST, NPF>;
    var pv: array<ST, NPF>;
    fetch(&pk, &pv, k4, 0u, kend, tid);
    for (var key0 = 0u; key0 < kend; key0 += BK) {
        workgroupBarrier();
        for (var i = 0u; i < NPF; i++) {
            let e = tid + i * NT;
            if (e < BK * D4) {
                let s = (e / D4) * DP + (e % D4) * 4u;
                put4(s, pk[i]);
                put4(s + BK * DP, pv[i]);
            }
        }
        workgroupBarrier();
        fetch(&pk, &pv, k4, key0 + BK, kend, tid);

        if (PAIRS == 1u) {
            for (var j = 0u; j < NJ; j += 2u) {
                var s0 = zero;
                var s1 = zero;
                for (var i = 0u; i < DQ; i++) {
                    let k0 = coopLoad<MatB>(&kv[j * 16u * DP + i * 16u], DP);
                    let k1 = coopLoad<MatB>(&kv[(j + 1u) * 16u * DP + i * 16u], DP);
                    s0 = coopMultiplyAdd(qa[i], k0, s0);
                    s1 = coopMultiplyAdd(qa[i], k1, s1);
                }
                coopStoreT(s0, &scr[sb + j * 16u], SP);
                coopStoreT(s1, &scr[sb + j * 16u + 16u], SP);
            }
        } else {
            for (var j = 0u; j < NJ; j++) {
                var s = zero;
                for (var i = 0u; i < DQ; i++) {
                    let kb = coopLoad<MatB>(&kv[j * 16u * DP + i * 16u], DP);
                    s = coopMultiplyAdd(qa[i], kb, s);
                }
                coopStoreT(s, &scr[sb + j * 16u], SP);
            }
        }
        workgroupBarrier();

        var x: array<f32, HB>;
        var mx = NEG;
        for (var c = 0u; c < HB; c++) {
            let col = 2u * c + half;
            let sv = scr[sb + r * SP + col];
            x[c] = select(NEG, sv * prm.scale_log2, visible(row, key0 + col));
            mx = max(mx, x[c]);
        }
        mx = max(mx, subgroupShuffleXor(mx, 1u));
        if (mx > m + RESCALE) {
            if (m != NEG) {
                let alpha = exp2(m - mx);
                l *= alpha;
                for (var c = 0u; c < D / 2u; c++) {
                    acc[c] *= alpha;
                }
            }
            m = mx;
        }
        for (var c = 0u; c < HB; c++) {
            let p = select(0.0, exp2(x[c] - m), x[c] != NEG);
            l += p;
            pm[pb + r * PP + 2u * c + half] = f16(p);
        }
        workgroupBarrier();

        for (var i0 = 0u; i0 < DQ; i0 += OW) {
            if (PAIRS == 1u) {
                for (var w = 0u; w < OW; w += 2u) {
                    var p0 = zero;
                    var p1 = zero;
                    for (var j = 0u; j < NJ; j++) {
                        let pa = coopLoadT<MatA>(&pm[pb + j * 16u], PP);
                        let vr = (BK + j * 16u) * DP + (i0 + w) * 16u;
                        let v0 = coopLoadT<MatB>(&kv[vr], DP);
                        let v1 = coopLoadT<MatB>(&kv[vr + 16u], DP);
                        p0 = coopMultiplyAdd(pa, v0, p0);
                        p1 = coopMultiplyAdd(pa, v1, p1);
                    }
                    coopStoreT(p0, &scr[sb + w * 16u], SP);
                    coopStoreT(p1, &scr[sb + w * 16u + 16u], SP);
                }
            } else {
                for (var w = 0u; w < OW; w++) {
                    var part = zero;
                    for (var j = 0u; j < NJ; j++) {
                        let pa = coopLoadT<MatA>(&pm[pb + j * 16u], PP);
                        let vb = coopLoadT<MatB>(&kv[(BK + j * 16u) * DP + (i0 + w) * 16u], DP);
                        part = coopMultiplyAdd(pa, vb, part);
                    }
                    coopStoreT(part, &scr[sb + w * 16u], SP);
                }
            }
            workgroupBarrier();
            for (var c = 0u; c < OW * 8u; c++) {
                acc[i0 * 8u + c] += scr[sb + r * SP + 2u * c + half];
            }
            workgroupBarrier();
        }
    }

    // O = acc / l, a round of OW slices at a time through the scratch, written as vec4 rows.
    let lt = l + subgroupShuffleXor(l, 1u);
    let inv = 1.0 / lt;
    for (var i0 = 0u; i0 < DQ; i0 += OW) {
        workgroupBarrier();
        for (var c = 0u; c < OW * 8u; c++) {
            scr[sb + r * SP + 2u * c + half] = acc[i0 * 8u + c] * inv;
        }
        workgroupBarrier();
        for (var e = lane; e < 16u * OW * 4u; e += 32u) {
            let rr = e / (OW * 4u);
            let cc = e % (OW * 4u);
            let grow = row0 + sg * 16u + rr;
            if (grow < prm.seq_q) {
                let a = sb + rr * SP + cc * 4u;
                let x = vec4<f32>(scr[a], scr[a + 1u], scr[a + 2u], scr[a + 3u]);
                o[q4 + grow * D4 + i0 * 4u + cc] = pack_st(x);
            }
        }
    }
    if (row < prm.seq_q && half == 0u) {
        lse[prm.r_off + bh * prm.seq_q + row] = (m + log2(lt)) * LN2;
    }
}
