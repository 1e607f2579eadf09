// The tile machinery the cooperative-matrix kernels share (attention_coop.wgsl,
// sparse_coop.wgsl and their backward kernels): per subgroup, 16 query rows against key tiles of
// BK keys staged in workgroup memory.
//   scores          S = Q Kᵀ, NJ = BK/16 chunks of D/16 multiply-adds, into the subgroup's
//                   scratch
//   online_softmax  (forwards) lane l owns row l/2 and the tile columns of parity l%2; lazy
//                   running maximum; P to workgroup memory as f16
//   accumulate_o    O += P V into O's D/16 accumulator matrices (the backwards' gradients too)
//   store_acc       O / l through the scratch, written as vec4 rows
// A lane's values of a row sit at the columns lane_col gives (coop_lanes.wgsl).
// The forwards keep O in accumulator matrices, which a row of P·V adds to on the tensor core; a
// matrix cannot be scaled row by row, so when a row's maximum grows the subgroup sends its O
// matrices once through the scratch. The running maximum is lazy (a row keeps a stale maximum
// until a tile exceeds it by more than RESCALE, log2 units), so P <= 2^RESCALE fits f16 and that
// round trip is rare (the first tiles of a row, mostly); the result is exact either way (l and O
// share the maximum). The decision is the subgroup's (subgroupAny), so the cooperative operations
// it guards sit in control flow that is uniform across the subgroup, which is what the tensor
// cores need, but not in what naga can prove uniform: the kernels turn naga's check off
// (`diagnostic(off, derivative_uniformity)`, the filter naga applies to cooperative operations).
// Where the tile allows (PAIRS = 1), S products go two at a time: two independent multiply-add
// chains share each A fragment, which hides the tensor cores' latency (9% at d 128 on the H100).
//
// Barriers: put_kv's are workgroup-wide (the K/V tile is shared); the rest order one subgroup's
// own scratch, and `sg_sync` makes them subgroup barriers where SG_SYNC = 1 (the forwards; needs
// SUBGROUP_BARRIER), workgroup barriers otherwise (the backwards, in uniform control flow).
// Needs: Params (attn_params.wgsl), `fn put_out(i: u32, x: ST)` (the output store), `enable
// wgpu_cooperative_matrix;` in the kernel file, and constants D, BK, NSG, DP (staged f16 row
// stride D + 8: rows 16 bytes apart in bank space), KV (staging halves), PAIRS, SG_SYNC, SPAD
// (f32 scratch row padding, 4 or 8 words: coop_lanes.wgsl).

//#include "coop_lanes.wgsl"

const RESCALE: f32 = 8.0;
const NJ: u32 = BK / 16u;
// Columns of a tile per lane, and f32 / f16 scratch row strides (16-byte multiples, offset so the
// 16 rows of a column do not all share a bank; the lanes' columns are spread by lane_col).
const HB: u32 = BK / 2u;
const SP: u32 = BK + SPAD;
const PP: u32 = BK + 8u;

alias MatA = coop_mat16x16<f16, A>;
alias MatB = coop_mat16x16<f16, B>;
alias MatC = coop_mat16x16<f32, C>;

// Staged rows (Q, K, V tiles; the kernel says where), addressed in halves (`at`, DP) and
// stored as vec4s: one 8-byte store per put4 and matrix loads with a stride of DP4 vec4s.
var<workgroup> kv: array<vec4<f16>, KV / 4u>;
// The staged row stride in vec4s (coopLoad's stride counts elements of the array it reads).
const DP4: u32 = DP / 4u;
// Per subgroup: S of a key tile, then the slices of P·V (16 x BK f32), and P (16 x BK f16).
var<workgroup> scr: array<f32, NSG * 16u * SP>;
var<workgroup> pm: array<f16, NSG * 16u * PP>;

// Four halves into the staging area at half `at` (a multiple of 4).
fn put4(at: u32, x: ST) {
    kv[at / 4u] = x;
}

// S = Q Kᵀ for the K rows staged from `kb` (BK rows, stride DP) into the scratch at `sb`.
fn scores(qa: ptr<function, array<MatA, DQ>>, kb: u32, sb: u32) {
    // Never written: the zero each product starts from.
    var zero: MatC;
    if (PAIRS == 1u) {
        for (var j = 0u; j < NJ; j += 2u) {
            var s0 = zero;
            var s1 = zero;
//#for I in 0..DQ
            s0 = coopMultiplyAdd((*qa)[{I}],
                coopLoad<MatB>(&kv[(kb + j * 16u * DP + {I} * 16u) / 4u], DP4), s0);
            s1 = coopMultiplyAdd((*qa)[{I}],
                coopLoad<MatB>(&kv[(kb + (j + 1u) * 16u * DP + {I} * 16u) / 4u], DP4), s1);
//#endfor
            coopStoreT(s0, &scr[sb + j * 16u], SP);
            coopStoreT(s1, &scr[sb + j * 16u + 16u], SP);
        }
    } else {
        for (var j = 0u; j < NJ; j++) {
            var s = zero;
//#for I in 0..DQ
            s = coopMultiplyAdd((*qa)[{I}],
                coopLoad<MatB>(&kv[(kb + j * 16u * DP + {I} * 16u) / 4u], DP4), s);
//#endfor
            coopStoreT(s, &scr[sb + j * 16u], SP);
        }
    }
    sg_sync();
}

// Orders the subgroup's own scratch (see the header).
fn sg_sync() {
//#if SG_SYNC
    subgroupBarrier();
//#else
    workgroupBarrier();
//#endif
}

// The forwards' functions (their rescale branch is only subgroup-uniform).
//#if SG_SYNC
// One tile's softmax for the lane's row: `x` holds its HB logits (log2 units; NEG = masked, at
// tile columns 2c + half). Moves the row maximum `m` (rescaling `l` and the O matrices when a
// row of the subgroup moves it) and writes P to the subgroup's rows of `pm` at `pb`. Forwards
// only (SG_SYNC = 1: the rescale is the subgroup's decision).
fn online_softmax(x: ptr<function, array<f32, HB>>, m: ptr<function, f32>,
                  l: ptr<function, f32>, o: ptr<function, array<MatC, DQ>>, sb: u32, pb: u32,
                  r: u32, half: u32) {
    var mx = NEG;
    for (var c = 0u; c < HB; c++) {
        mx = max(mx, (*x)[c]);
    }
    mx = max(mx, subgroupShuffleXor(mx, 1u));
    let grow = mx > *m + RESCALE;
    if (subgroupAny(grow)) {
        // exp2(NEG - mx) is 0: a row's first visible tile scales its (zero) O by 0.
        let alpha = select(1.0, exp2(*m - mx), grow);
        // Every lane has read its S from the scratch before O goes through it.
        sg_sync();
//#for I in 0..DQ
        coopStoreT((*o)[{I}], &scr[sb], SP);
        sg_sync();
        scale_row(sb, r, half, alpha);
        sg_sync();
        (*o)[{I}] = coopLoadT<MatC>(&scr[sb], SP);
        sg_sync();
//#endfor
    }
    if (grow) {
        *l *= select(1.0, exp2(*m - mx), *m != NEG);
        *m = mx;
    }
    for (var c = 0u; c < HB; c++) {
        let p = select(0.0, exp2((*x)[c] - *m), (*x)[c] != NEG);
        *l += p;
        pm[pb + r * PP + lane_col(c, HB, r, half)] = f16(p);
    }
    sg_sync();
}

//#endif

// O += P V for the V rows staged from `vb` (BK rows, stride DP): the tile's P fragments once,
// then D/16 independent multiply-add chains (the backwards: dQ += dS K, dV += Pᵀ dO,
// dK += dSᵀ Q).
fn accumulate_o(o: ptr<function, array<MatC, DQ>>, vb: u32, pb: u32) {
    for (var j = 0u; j < NJ; j++) {
        let pa = coopLoadT<MatA>(&pm[pb + j * 16u], PP);
//#for I in 0..DQ
        (*o)[{I}] = coopMultiplyAdd(pa,
            coopLoadT<MatB>(&kv[(vb + j * 16u * DP + {I} * 16u) / 4u], DP4), (*o)[{I}]);
//#endfor
    }
}

// The lane's 8 columns of row r of the 16 x 16 block in the scratch at `sb`, times `f`.
fn scale_row(sb: u32, r: u32, half: u32, f: f32) {
    for (var c = 0u; c < 8u; c++) {
        scr[sb + r * SP + lane_col(c, 8u, r, half)] *= f;
    }
}

// O · inv (inv: the lane's row's factor) for the subgroup's 16 rows, a matrix a round through
// the scratch: row rr goes to vec4 index base + rr·stride of the kernel's output (its
// `put_out`); rows at or past `nrows` are not written.
fn store_acc(o: ptr<function, array<MatC, DQ>>, inv: f32, base: u32, stride: u32, nrows: u32,
             sb: u32, r: u32, half: u32, lane: u32) {
//#for I in 0..DQ
    sg_sync();
    coopStoreT((*o)[{I}], &scr[sb], SP);
    sg_sync();
    scale_row(sb, r, half, inv);
    sg_sync();
    store_cols(base + {I} * 4u, stride, nrows, sb, lane);
//#endfor
}

// The scratch's 16 x 16 block at `sb` to the output: row rr at vec4 index at + rr·stride.
fn store_cols(at: u32, stride: u32, nrows: u32, sb: u32, lane: u32) {
    for (var e = lane; e < 64u; e += 32u) {
        let rr = e / 4u;
        let cc = e % 4u;
        if (rr < nrows) {
            let a = sb + rr * SP + cc * 4u;
            let x = vec4<f32>(scr[a], scr[a + 1u], scr[a + 2u], scr[a + 3u]);
            put_out(at + rr * stride + cc, pack_st(x));
        }
    }
}
