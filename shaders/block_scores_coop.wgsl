// Block scores (block_select.wgsl's `block_scores`, same definition and output) on cooperative
// matrices (tensor cores): f16 q, the pooled keys rounded to f16 as they are staged, f32 logits,
// statistics and scores. Needs what attention_coop.wgsl needs (src/ops/coop.rs checks it).
//
// One workgroup per (tile of BQ = 16·NSG query rows, unit): row r is token t0 + r / G, head
// r % G (G divides BQ, so a tile holds whole tokens); subgroup sg owns rows sg·16 .. sg·16 + 15
// and keeps their Q fragments in registers. Two passes over the tile's candidate pooled keys, BK
// at a time (staged in workgroup memory, shared by the subgroups, the next tile's loads in
// flight while this one is multiplied):
//   1. S = Q K̄ᵀ into the subgroup's scratch; lane l keeps row l/2's running max and sum of
//      exp2 over the tile columns of parity l%2 (SSA, InfLLM-V2; MoBA has no normaliser)
//   2. S again; P = exp2(S - lse) (MoBA: the scaled logits), and each (token, pooled key) sums
//      its token's G rows into `scores`: by subgroup shuffles where G divides 16 (`head_sums`),
//      else through the scratch after a workgroup barrier.
// Pooled keys past the tile's candidates are not multiplied; their scores are NEG.
// Constants: D, DQ = D/16, DP = D + 8 (staged f16 row stride), BK (pooled keys a step, a
// multiple of 32), NSG, NT = 32·NSG, BQ = 16·NSG, KV = staged rows · DP (the key tile, or QR
// rows of Q a round), QR; GS = 1 where the group G divides 16, then GL = log2 G (else 0, 0);
// and select_common.wgsl's BLK, NBP, NOSA, VARLEN (0: prefill only).
//#include "attn_params.wgsl"
//#include "select_common.wgsl"
enable wgpu_cooperative_matrix;
// The Q fragments load in a branch uniform across the subgroup, not the workgroup (the
// forwards of attention_coop.wgsl do the same).
diagnostic(off, derivative_uniformity);

const NJ: u32 = BK / 16u;
const HB: u32 = BK / 2u;
// f32 scratch row stride: a 16-byte multiple, offset so a column's rows spread over the banks.
const SP: u32 = BK + 4u;
// vec4s of a key tile per invocation.
const NPW: u32 = (BK * D4 + NT - 1u) / NT;

alias MatA = coop_mat16x16<f16, A>;
alias MatB = coop_mat16x16<f16, B>;
alias MatC = coop_mat16x16<f32, C>;

var<workgroup> kv: array<vec4<f16>, KV / 4u>;
// The staged row stride in vec4s (coopLoad's stride counts elements of the array it reads).
const DP4: u32 = DP / 4u;
// Row r of the tile's S (then P) at r·SP; subgroup sg owns rows sg·16 ..
var<workgroup> scr: array<f32, BQ * SP>;

fn put4(at: u32, x: vec4<f16>) {
    kv[at / 4u] = x;
}

// Pooled keys [p0, p0 + BK) of the unit (from vec4 index kb4; zero at or past `end`) into
// registers.
fn fetch_keys(x: ptr<function, array<vec4<f32>, NPW>>, kb4: u32, p0: u32, end: u32, tid: u32) {
    for (var i = 0u; i < NPW; i++) {
        let e = tid + i * NT;
        let p = p0 + e / D4;
        var a = vec4<f32>(0.0);
        if (e < BK * D4 && p < end) {
            a = kbar[kb4 + p * D4 + e % D4];
        }
        (*x)[i] = a;
    }
}

// The fetched keys into the staging area as f16 rows. Between workgroup barriers: the last
// step's readers are done before, every subgroup sees the tile after.
fn put_keys(x: ptr<function, array<vec4<f32>, NPW>>, tid: u32) {
    workgroupBarrier();
    for (var i = 0u; i < NPW; i++) {
        let e = tid + i * NT;
        if (e < BK * D4) {
            put4((e / D4) * DP + (e % D4) * 4u, vec4<f16>((*x)[i]));
        }
    }
    workgroupBarrier();
}

// S = Q K̄ᵀ of the staged tile into the subgroup's scratch rows at `sb`, two independent
// multiply-add chains at a time (NJ is even).
fn tile_logits(qa: ptr<function, array<MatA, DQ>>, sb: u32) {
    // Never written: the zero each product starts from.
    var zero: MatC;
    for (var j = 0u; j < NJ; j += 2u) {
        var s0 = zero;
        var s1 = zero;
//#for I in 0..DQ
        s0 = coopMultiplyAdd((*qa)[{I}],
            coopLoad<MatB>(&kv[(j * 16u * DP + {I} * 16u) / 4u], DP4), s0);
        s1 = coopMultiplyAdd((*qa)[{I}],
            coopLoad<MatB>(&kv[((j + 1u) * 16u * DP + {I} * 16u) / 4u], DP4), s1);
//#endfor
        coopStoreT(s0, &scr[sb + j * 16u], SP);
        coopStoreT(s1, &scr[sb + j * 16u + 16u], SP);
    }
    subgroupBarrier();
}

// A logit's probability (MoBA: the scaled logit), from the row's log-sum-exp `lse` (log2).
fn prob(s: f32, sl2: f32, lse: f32, moba: bool) -> f32 {
    return select(exp2(s * sl2 - lse), s * prm.scale, moba);
}

// The subgroup's scores of the staged tile where G divides 16 (GS = 1): lane (r, half) takes
// its row's HB probabilities (columns 2c + half) from the scratch, then GL rounds of a
// reduce-scatter over its token's rows (lane bits 1 .. GL), each halving the values, so that
// it ends with its token's sums at HB >> GL columns, which it writes (at G 16, lane l column
// l). This replaces a trip of P through the scratch, a workgroup barrier and G scratch reads
// per score.
fn head_sums(p0: u32, pend: u32, t: u32, sb: u32, r: u32, half: u32, lane: u32, moba: bool,
             sl2: f32, lse: f32, u: u32) {
    // The loops run to BK (a pipeline constant) for the preprocessor; the indices are
    // constants, clamped into the array where the guard already excludes them.
    var v: array<f32, HB>;
//#for C in 0..BK
    if ({C} < HB) {
        let s = scr[sb + r * SP + 2u * {C} + half];
        let p = prob(s, sl2, lse, moba);
        v[min({C}, HB - 1u)] = select(0.0, p, p0 + 2u * {C} + half < pend);
    }
//#endfor
    // Every lane has read the scratch before the next tile's S is stored there.
    subgroupBarrier();
    if (GL >= 1u) {
        fold(&v, 2u, HB / 2u, lane);
    }
    if (GL >= 2u) {
        fold(&v, 4u, HB / 4u, lane);
    }
    if (GL >= 3u) {
        fold(&v, 8u, HB / 8u, lane);
    }
    if (GL >= 4u) {
        fold(&v, 16u, HB / 16u, lane);
    }
    // Value j now sums the token's rows at tile column 2·((j << GL) + base) + half.
    let base = (lane >> 1u) & ((1u << GL) - 1u);
    if (t < prm.seq_q) {
        let at = prm.s_off + (u * prm.seq_q + t) * prm.np;
//#for J in 0..BK
        if ({J} < (HB >> GL)) {
            let p = p0 + 2u * (({J} << GL) + base) + half;
            if (p < prm.np) {
                scores[at + p] = select(NEG, v[min({J}, HB - 1u)], p < pend);
            }
        }
//#endfor
    }
}

// One reduce-scatter round over the lanes `mask` apart, of the first 2h values: the pair
// (2j, 2j + 1) becomes value j, the lane with `mask` set keeping the odd one and its partner
// the even one, each adding the other's. Constant indices keep `v` in registers.
fn fold(v: ptr<function, array<f32, HB>>, mask: u32, h: u32, lane: u32) {
    let up = (lane & mask) != 0u;
//#for J in 0..BK
    if ({J} < h) {
        let a = (*v)[min(2u * {J}, HB - 1u)];
        let b = (*v)[min(2u * {J} + 1u, HB - 1u)];
        (*v)[min({J}, HB - 1u)] = select(a, b, up) + subgroupShuffleXor(select(b, a, up), mask);
    }
//#endfor
}

@compute @workgroup_size(NT)
fn block_scores_coop(@builtin(workgroup_id) wg: vec3<u32>,
                     @builtin(local_invocation_index) tid: u32) {
    // Subgroups of 32 (checked on the host) hold consecutive invocations.
    let sg = tid / 32u;
    let lane = tid % 32u;
    let u = wg.y;
    let tpw = BQ / prm.group;
    let t0 = wg.x * tpw;
    let g = unit_of(u);
    let moba = prm.mode == 1u;
    // Candidates of the tile's last token bound every row's (uniform across the workgroup).
    let p_end = pooled_end(g, min(t0 + tpw, prm.seq_q) - 1u);

    // The tile's Q rows through the staging area, QR rows a round; each subgroup takes its
    // fragments in the round that holds them.
    var qa: array<MatA, DQ>;
    for (var q0 = 0u; q0 < BQ; q0 += QR) {
        workgroupBarrier();
        for (var e = tid; e < QR * D4; e += NT) {
            let rr = q0 + e / D4;
            let t = t0 + rr / prm.group;
            var x = ST(0.0);
            if (rr < BQ && t < prm.seq_q) {
                let h = u * prm.group + rr % prm.group;
                x = q[prm.q_off / 4u + (h * prm.seq_q + t) * D4 + e % D4];
            }
            put4((e / D4) * DP + (e % D4) * 4u, vec4<f16>(unpack_st(x)));
        }
        workgroupBarrier();
        if (sg * 16u >= q0 && sg * 16u < q0 + QR) {
//#for I in 0..DQ
            qa[{I}] = coopLoadT<MatA>(&kv[((sg * 16u - q0) * DP + {I} * 16u) / 4u], DP4);
//#endfor
        }
    }

    // Lane l: row l/2 of the subgroup's 16, tile columns of parity l%2.
    let r = lane / 2u;
    let half = lane % 2u;
    let t = t0 + (sg * 16u + r) / prm.group;
    let pend = select(0u, pooled_end(g, t), t < prm.seq_q);
    let sb = sg * 16u * SP;
    let kb4 = prm.kb_off / 4u + u * prm.np * D4;
    let sl2 = prm.scale * LOG2E;
    var pk: array<vec4<f32>, NPW>;

    // Pass 1: the row's log-sum-exp (log2 domain) over its candidates.
    var m = NEG;
    var l = 0.0;
    if (!moba) {
        fetch_keys(&pk, kb4, 0u, p_end, tid);
        for (var p0 = 0u; p0 < p_end; p0 += BK) {
            put_keys(&pk, tid);
            fetch_keys(&pk, kb4, p0 + BK, p_end, tid);
            tile_logits(&qa, sb);
            var x: array<f32, HB>;
            var mx = m;
            for (var c = 0u; c < HB; c++) {
                let col = 2u * c + half;
                x[c] = select(NEG, scr[sb + r * SP + col] * sl2, p0 + col < pend);
                mx = max(mx, x[c]);
            }
            // exp2(NEG - mx) is 0: the row's first candidates scale its (zero) sum by 0.
            l *= exp2(m - mx);
            m = mx;
            for (var c = 0u; c < HB; c++) {
                l += select(0.0, exp2(x[c] - m), x[c] != NEG);
            }
        }
        let mo = subgroupShuffleXor(m, 1u);
        let lo = subgroupShuffleXor(l, 1u);
        let mm = max(m, mo);
        l = l * exp2(m - mm) + lo * exp2(mo - mm);
        m = mm;
    }
    let lse = m + log2(max(l, 1e-30));

    // Pass 2: probabilities (MoBA: scaled logits), then each (token, pooled key) sums its G
    // rows; past the candidates, NEG. Where G divides 16 (GL = log2 G, GS = 1) the subgroup's
    // lanes sum their token's rows by shuffles; else P goes back to the scratch and, after a
    // workgroup barrier, a thread sums each (token, pooled key) from there.
    fetch_keys(&pk, kb4, 0u, p_end, tid);
    for (var p0 = 0u; p0 < prm.np; p0 += BK) {
        if (p0 < p_end) {
            put_keys(&pk, tid);
            fetch_keys(&pk, kb4, p0 + BK, p_end, tid);
            tile_logits(&qa, sb);
            if (GS == 1u) {
                head_sums(p0, pend, t, sb, r, half, lane, moba, sl2, lse, u);
                continue;
            }
            for (var c = 0u; c < HB; c++) {
                let a = sb + r * SP + 2u * c + half;
                let s = scr[a];
                let p = prob(s, sl2, lse, moba);
                scr[a] = select(0.0, p, p0 + 2u * c + half < pend);
            }
            workgroupBarrier();
        }
        for (var e = tid; e < tpw * BK; e += NT) {
            let tt = e / BK;
            let c = e % BK;
            let te = t0 + tt;
            let p = p0 + c;
            if (te < prm.seq_q && p < prm.np) {
                var sum = NEG;
                // Past p_end (the tile's last token's end) no token has candidates.
                if (p0 < p_end && p < pooled_end(g, te)) {
                    sum = 0.0;
                    for (var h = 0u; h < prm.group; h++) {
                        sum += scr[(tt * prm.group + h) * SP + c];
                    }
                }
                scores[prm.s_off + (u * prm.seq_q + te) * prm.np + p] = sum;
            }
        }
        // scr is rewritten only after the next step's barriers.
    }
}
