// The tile machinery the cooperative-matrix kernels share (attention_coop.wgsl,
// sparse_coop.wgsl): per subgroup, 16 query rows against key tiles of BK keys staged in
// workgroup memory.
//   scores        S = Q Kᵀ, NJ = BK/16 chunks of D/16 multiply-adds, into the subgroup's scratch
//   softmax_tile  lane l owns row l/2 and the tile columns of parity l%2; lazy running maximum;
//                 P to workgroup memory as f16
//   accumulate_pv per 16-column slice of O: a product from zero goes through the scratch into
//                 the lanes' f32 registers, which carry O for the whole kernel
//   store_o       O rows through the scratch, written as vec4s
// O lives in registers rather than in cooperative matrices because a matrix cannot be scaled row
// by row: the first version sent every output matrix through workgroup memory each tile to
// rescale it (44% of its time). The running maximum is lazy (a row keeps a stale maximum until a
// tile exceeds it by more than RESCALE, log2 units), so P <= 2^RESCALE fits f16 and the rescale
// is rare; the result is exact either way (l and O share the maximum). Where the tile allows
// (PAIRS = 1), products go two at a time: two independent multiply-add chains share each A
// fragment, which hides the tensor cores' latency (9% at d 128 on the H100).
//
// Every function here holds barriers or cooperative operations: call them in uniform control
// flow. Barriers are workgroup-wide (subgroupBarrier needs SUBGROUP_BARRIER).
// Needs: Params (attn_params.wgsl), `fn put_out(i: u32, x: ST)` (the output store), `enable
// wgpu_cooperative_matrix;` in the
// kernel file, and constants D, BK, NSG, DP (staged f16 row stride D + 8: rows 16 bytes apart in
// bank space), KV (staging halves), OW (O slices per round; divides D/16 and BK/16), PAIRS.

const RESCALE: f32 = 8.0;
const DQ: u32 = D / 16u;
const NJ: u32 = BK / 16u;
// Columns of a tile per lane, and f32 / f16 scratch row strides (16-byte multiples, offset so the
// 16 rows of a column do not all share a bank).
const HB: u32 = BK / 2u;
const SP: u32 = BK + 4u;
const PP: u32 = BK + 8u;

alias MatA = coop_mat16x16<f16, A>;
alias MatB = coop_mat16x16<f16, B>;
alias MatC = coop_mat16x16<f32, C>;

// Staged rows (Q, K, V tiles; the kernel says where).
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

// S = Q Kᵀ for the K rows staged from `kb` (BK rows, stride DP) into the scratch at `sb`.
fn scores(qa: ptr<function, array<MatA, DQ>>, kb: u32, sb: u32) {
    // Never written: the zero each product starts from.
    var zero: MatC;
    if (PAIRS == 1u) {
        for (var j = 0u; j < NJ; j += 2u) {
            var s0 = zero;
            var s1 = zero;
            for (var i = 0u; i < DQ; i++) {
                let k0 = coopLoad<MatB>(&kv[kb + j * 16u * DP + i * 16u], DP);
                let k1 = coopLoad<MatB>(&kv[kb + (j + 1u) * 16u * DP + i * 16u], DP);
                s0 = coopMultiplyAdd((*qa)[i], k0, s0);
                s1 = coopMultiplyAdd((*qa)[i], k1, s1);
            }
            coopStoreT(s0, &scr[sb + j * 16u], SP);
            coopStoreT(s1, &scr[sb + j * 16u + 16u], SP);
        }
    } else {
        for (var j = 0u; j < NJ; j++) {
            var s = zero;
            for (var i = 0u; i < DQ; i++) {
                let k = coopLoad<MatB>(&kv[kb + j * 16u * DP + i * 16u], DP);
                s = coopMultiplyAdd((*qa)[i], k, s);
            }
            coopStoreT(s, &scr[sb + j * 16u], SP);
        }
    }
    workgroupBarrier();
}

// One tile's softmax for the lane's row: `x` holds its HB logits (log2 units; NEG = masked, at
// tile columns 2c + half). Moves the row maximum `m` (rescaling `l` and `acc` when it moves) and
// writes P to the subgroup's rows of `pm` at `pb`.
fn softmax_tile(x: ptr<function, array<f32, HB>>, m: ptr<function, f32>, l: ptr<function, f32>,
                acc: ptr<function, array<f32, D / 2u>>, pb: u32, r: u32, half: u32) {
    var mx = NEG;
    for (var c = 0u; c < HB; c++) {
        mx = max(mx, (*x)[c]);
    }
    mx = max(mx, subgroupShuffleXor(mx, 1u));
    if (mx > *m + RESCALE) {
        if (*m != NEG) {
            let alpha = exp2(*m - mx);
            *l *= alpha;
            for (var c = 0u; c < D / 2u; c++) {
                (*acc)[c] *= alpha;
            }
        }
        *m = mx;
    }
    for (var c = 0u; c < HB; c++) {
        let p = select(0.0, exp2((*x)[c] - *m), (*x)[c] != NEG);
        *l += p;
        pm[pb + r * PP + 2u * c + half] = f16(p);
    }
    workgroupBarrier();
}

// O += P V for the V rows staged from `vb` (BK rows, stride DP), OW slices per round.
fn accumulate_pv(acc: ptr<function, array<f32, D / 2u>>, vb: u32, sb: u32, pb: u32, r: u32,
                 half: u32) {
    var zero: MatC;
    for (var i0 = 0u; i0 < DQ; i0 += OW) {
        if (PAIRS == 1u) {
            for (var w = 0u; w < OW; w += 2u) {
                var p0 = zero;
                var p1 = zero;
                for (var j = 0u; j < NJ; j++) {
                    let pa = coopLoadT<MatA>(&pm[pb + j * 16u], PP);
                    let vr = vb + j * 16u * DP + (i0 + w) * 16u;
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
                    let v = coopLoadT<MatB>(&kv[vb + j * 16u * DP + (i0 + w) * 16u], DP);
                    part = coopMultiplyAdd(pa, v, part);
                }
                coopStoreT(part, &scr[sb + w * 16u], SP);
            }
        }
        workgroupBarrier();
        for (var c = 0u; c < OW * 8u; c++) {
            (*acc)[i0 * 8u + c] += scr[sb + r * SP + 2u * c + half];
        }
        workgroupBarrier();
    }
}

// O = acc · inv for the subgroup's 16 rows: row rr goes to vec4 index base + rr·stride of the
// kernel's output (its `put_out`); rows at or past `nrows` are not written.
fn store_o(acc: ptr<function, array<f32, D / 2u>>, inv: f32, base: u32, stride: u32, nrows: u32,
           sb: u32, r: u32, half: u32, lane: u32) {
    for (var i0 = 0u; i0 < DQ; i0 += OW) {
        workgroupBarrier();
        for (var c = 0u; c < OW * 8u; c++) {
            scr[sb + r * SP + 2u * c + half] = (*acc)[i0 * 8u + c] * inv;
        }
        workgroupBarrier();
        for (var e = lane; e < 16u * OW * 4u; e += 32u) {
            let rr = e / (OW * 4u);
            let cc = e % (OW * 4u);
            if (rr < nrows) {
                let a = sb + rr * SP + cc * 4u;
                let x = vec4<f32>(scr[a], scr[a + 1u], scr[a + 2u], scr[a + 3u]);
                put_out(base + rr * stride + i0 * 4u + cc, pack_st(x));
            }
        }
    }
}
