// Block selection (PAPERS.md §1; reference: src/reference/select.rs). Three entries:
//   block_keys:   k̄_p = mean of the keys of pooling window p: the blocks (SSA, MoBA) or
//                 InfLLM-V2's 32-token kernels at stride 16             (thread per vec4 element)
//   block_scores: score_p = Σ_{h in group} softmax_p(s·q_h·k̄_p) (SSA, InfLLM-V2) or
//                 Σ_h s·q_h·k̄_p (MoBA) over the windows the token scores (causal: the complete
//                 ones, no key after the token); others get NEG
//                                      (workgroup per tile of tokens x all heads of the group)
//   block_topk:   block scores (InfLLM-V2: max over the candidate kernels overlapping the block),
//                 forced blocks, then the best scores (ties to the lower index), k in all,
//                 written ascending and padded with SENTINEL         (workgroup per token row)
// Constants from the launcher: BLK (block size), NBP (power of two >= blocks), and the tile
// constants of common.wgsl for block_scores (NT threads is shared by all three entries).

//#include "common.wgsl"
//#include "select_common.wgsl"
//#include "bitonic.wgsl"

var<workgroup> sh_key: array<f32, NBP>;

@compute @workgroup_size(NT)
fn block_keys(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let e = (wg.y * prm.grid_x + wg.x) * NT + tid;
    let w = pool_window(e / D4);
    if (w.x == SENTINEL) {
        return;
    }
    let u = w.x;
    let p = w.y;
    let c = e % D4;
    let t0 = p * prm.pool_s;
    let t1 = min(t0 + prm.pool_w, prm.seq_k);
    var acc = vec4<f32>(0.0);
    for (var t = t0; t < t1; t++) {
        acc += unpack_st(k[prm.k_off / 4u + key_row(u, t) * D4 + c]);
    }
    kbar[prm.kb_off / 4u + (u * prm.np + p) * D4 + c] = acc / f32(t1 - t0);
}

// (unit, window) that pooling slot n computes, or SENTINEL: every window of every unit, or
// (VARLEN) the pool_new slots of each unit after the windows complete before the newest n_new
// tokens, up to those complete now.
fn pool_window(n: u32) -> vec2<u32> {
//#if VARLEN
    if (n >= prm.units * prm.pool_new) {
        return vec2<u32>(SENTINEL, 0u);
    }
    let u = n / prm.pool_new;
    let g = unit_of(u);
    let p = complete_windows(g.len - min(prm.n_new, g.len)) + n % prm.pool_new;
    if (p >= complete_windows(g.len)) {
        return vec2<u32>(SENTINEL, 0u);
    }
    return vec2<u32>(u, p);
//#else
    if (n >= prm.units * prm.np) {
        return vec2<u32>(SENTINEL, 0u);
    }
    return vec2<u32>(n / prm.np, n % prm.np);
//#endif
}

// Tensor `which` of the staging helpers in common.wgsl: 0 = q, 1 = pooled keys.
fn fetch(which: u32, g: u32) -> vec4<f32> {
    if (which == 0u) {
        return unpack_st(q[g]);
    }
    return kbar[g];
}

// q row r of the token tile starting at t0: token t0 + r / G, head r % G (rows past the tile's
// tokens or the sequence are padding). Returns the row's vec4 base, or SENTINEL for padding.
fn score_row(u: u32, t0: u32, r: u32) -> u32 {
    let tt = r / prm.group;
    let t = t0 + tt;
    if (tt >= BQ / prm.group || t >= prm.seq_q) {
        return SENTINEL;
    }
    return prm.q_off / 4u + ((u * prm.group + r % prm.group) * prm.seq_q + t) * D4;
}

// The tile's Q rows, head dims [d0v, d0v + DCV), in registers one staging step ahead (like
// chunk_load for the pooled keys): the global loads overlap the previous step's products.
fn q_load(u: u32, t0: u32, d0v: u32, tid: u32) -> array<vec4<f32>, QPT> {
    var x: array<vec4<f32>, QPT>;
    for (var n = 0u; n < QPT; n++) {
        let e = tid + n * NT;
        x[n] = vec4<f32>(0.0);
        if (e < BQ * DCV) {
            let base = score_row(u, t0, e / DCV);
            if (base != SENTINEL) {
                x[n] = fetch(0u, base + d0v + e % DCV);
            }
        }
    }
    return x;
}

fn q_store(x: ptr<function, array<vec4<f32>, QPT>>, tid: u32) {
    for (var n = 0u; n < QPT; n++) {
        let e = tid + n * NT;
        if (e < BQ * DCV) {
            sh0[(e / DCV) * DSV + e % DCV] = (*x)[n];
        }
    }
}

// Logits of the tile against pooled keys [p0, p0 + BK), scaled by `scale`; NEG where the key
// is not a candidate of the row's token.
fn score_logits(g: Unit, u: u32, t0: u32, p0: u32, scale: f32, tid: u32, ty: u32, tx: u32) -> Logits {
    var s: Logits;
    for (var i = 0u; i < TM * TN; i++) {
        s[i] = 0.0;
    }
    let kb4 = prm.kb_off / 4u + u * prm.np * D4;
    var qr = q_load(u, t0, 0u, tid);
    var kr = chunk_load(1u, kb4, p0, g.np, 0u, tid);
    for (var d0 = 0u; d0 < D4; d0 += DCV) {
        q_store(&qr, tid);
        chunk_store(BQ, &kr, tid);
        workgroupBarrier();
        if (d0 + DCV < D4) {
            qr = q_load(u, t0, d0 + DCV, tid);
            kr = chunk_load(1u, kb4, p0, g.np, d0 + DCV, tid);
        }
        logits_acc(&s, 0u, BQ, ty, tx);
        workgroupBarrier();
    }
    for (var i = 0u; i < TM; i++) {
        let end = pooled_end(g, t0 + (ty * TM + i) / prm.group);
        for (var j = 0u; j < TN; j++) {
            s[i * TN + j] = select(NEG, s[i * TN + j] * scale, p0 + tx + TC * j < end);
        }
    }
    return s;
}

//#if SPLIT
// Per (unit, token row, split): the row's max and sum (log2 domain) over the split's keys.
@group(0) @binding(9) var<storage, read_write> part: array<vec2<f32>>;
//#endif

// The tile and the key range of a block-score workgroup: wg.x = tile · n_split + split; the
// pooled keys [split · split_np, +split_np) (the whole row when n_split = 1).
struct ScoreWg {
    t0: u32,
    pa: u32,
    pb: u32,
}

fn score_wg(x: u32) -> ScoreWg {
    let split = x % prm.n_split;
    let pa = split * prm.split_np;
    return ScoreWg((x / prm.n_split) * (BQ / prm.group), pa, min(pa + prm.split_np, prm.np));
}

// Pass 1 over the candidates in pooled keys [pa, pb) of the tile's rows: each row's max and
// sum of exp2 (log2 domain), this thread's TM rows. Call in uniform control flow.
fn row_stats(g: Unit, u: u32, t0: u32, pa: u32, pb: u32, tid: u32, ty: u32, tx: u32) -> array<vec2<f32>, TM> {
    var m: array<f32, TM>;
    var l: array<f32, TM>;
    for (var i = 0u; i < TM; i++) {
        m[i] = NEG;
        l[i] = 0.0;
    }
    for (var p0 = pa; p0 < pb; p0 += BK) {
        var s = score_logits(g, u, t0, p0, prm.scale * LOG2E, tid, ty, tx);
        for (var i = 0u; i < TM; i++) {
            var mx = m[i];
            for (var j = 0u; j < TN; j++) {
                mx = max(mx, s[i * TN + j]);
            }
            var sum = l[i] * exp2(m[i] - mx);
            for (var j = 0u; j < TN; j++) {
                let x = s[i * TN + j];
                sum += select(0.0, exp2(x - mx), x != NEG);
            }
            m[i] = mx;
            l[i] = sum;
        }
    }
    for (var i = 0u; i < TM; i++) {
        sh0_set((ty * TM + i) * TC + tx, m[i]);
    }
    workgroupBarrier();
    var out: array<vec2<f32>, TM>;
    for (var i = 0u; i < TM; i++) {
        out[i].x = row_max(ty * TM + i, NEG);
    }
    workgroupBarrier();
    for (var i = 0u; i < TM; i++) {
        sh0_set((ty * TM + i) * TC + tx, select(0.0, l[i] * exp2(m[i] - out[i].x), m[i] != NEG));
    }
    workgroupBarrier();
    for (var i = 0u; i < TM; i++) {
        out[i].y = row_sum(ty * TM + i);
    }
    workgroupBarrier();
    return out;
}

//#if SPLIT
// Where row r of the tile at t0 keeps its split statistics (index of split 0), or SENTINEL
// for a padding row.
fn part_row(u: u32, t0: u32, r: u32) -> u32 {
    if (r / prm.group >= BQ / prm.group || t0 + r / prm.group >= prm.seq_q) {
        return SENTINEL;
    }
    return prm.pt_off / 2u + ((u * prm.seq_q + t0) * prm.group + r) * prm.n_split;
}

// A row's log-sum-exp (log2 domain) from its splits' max and sum, stored from `at` on.
fn merged_lse2(at: u32) -> f32 {
    var mx = NEG;
    for (var s = 0u; s < prm.n_split; s++) {
        mx = max(mx, part[at + s].x);
    }
    var sum = 0.0;
    for (var s = 0u; s < prm.n_split; s++) {
        let st = part[at + s];
        sum += select(0.0, st.y * exp2(st.x - mx), st.x != NEG);
    }
    return mx + log2(max(sum, 1e-30));
}

// Pass 1 of a split row (SSA, InfLLM-V2): the statistics of the split's keys, merged by
// block_scores.
@compute @workgroup_size(NT)
fn block_lse(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let u = wg.y;
    let w = score_wg(wg.x);
    let ty = tid / TC;
    let tx = tid % TC;
    let g = unit_of(u);
    let p_end = pooled_end(g, min(w.t0 + BQ / prm.group, prm.seq_q) - 1u);
    let st = row_stats(g, u, w.t0, w.pa, min(w.pb, p_end), tid, ty, tx);
    if (tx == 0u) {
        for (var i = 0u; i < TM; i++) {
            let at = part_row(u, w.t0, ty * TM + i);
            if (at != SENTINEL) {
                part[at + wg.x % prm.n_split] = st[i];
            }
        }
    }
}
//#endif

// One workgroup per tile of BQ / G tokens (all G query heads of each), (batch, kv head) and
// split of the pooled keys: the logits are a tiled matrix product of those rows with the
// pooled keys. SSA and InfLLM-V2 take two passes (each row's log-sum-exp over its candidates,
// then the normalised probabilities summed over the heads); MoBA sums the scaled logits in
// one. With SPLIT, block_lse ran pass 1 per split and this merges the splits' statistics.
@compute @workgroup_size(NT)
fn block_scores(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let u = wg.y;
    let tpw = BQ / prm.group;
    let w = score_wg(wg.x);
    let t0 = w.t0;
    let ty = tid / TC;
    let tx = tid % TC;
    let moba = prm.mode == 1u;
    let g = unit_of(u);
    // Candidates of the tile's last token bound every row's.
    let p_end = pooled_end(g, min(t0 + tpw, prm.seq_q) - 1u);
    var lse2: array<f32, TM>;
    for (var i = 0u; i < TM; i++) {
        lse2[i] = 0.0;
    }
    if (!moba) {
//#if SPLIT
        for (var i = 0u; i < TM; i++) {
            let at = part_row(u, t0, ty * TM + i);
            if (at != SENTINEL) {
                lse2[i] = merged_lse2(at);
            }
        }
//#else
        let st = row_stats(g, u, t0, 0u, p_end, tid, ty, tx);
        for (var i = 0u; i < TM; i++) {
            lse2[i] = st[i].x + log2(max(st[i].y, 1e-30));
        }
//#endif
    }
    // Pass 2: per-row probabilities (SSA, InfLLM-V2) or logits (MoBA) into sh1, then each
    // (token, pooled key) sums its token's G rows.
    let scale = select(prm.scale * LOG2E, prm.scale, moba);
    for (var p0 = w.pa; p0 < w.pb; p0 += BK) {
        if (p0 < p_end) {
            let s = score_logits(g, u, t0, p0, scale, tid, ty, tx);
            for (var i = 0u; i < TM; i++) {
                for (var j = 0u; j < TN; j++) {
                    let x = s[i * TN + j];
                    let p = select(exp2(x - lse2[i]), x, moba);
                    sh1_set((ty * TM + i) * BK + tx + TC * j, select(0.0, p, x != NEG));
                }
            }
            workgroupBarrier();
        }
        for (var e = tid; e < tpw * BK; e += NT) {
            let tt = e / BK;
            let c = e % BK;
            let t = t0 + tt;
            let p = p0 + c;
            if (t < prm.seq_q && p < w.pb) {
                var sum = NEG;
                if (p < pooled_end(g, t)) {
                    sum = 0.0;
                    for (var h = 0u; h < prm.group; h++) {
                        sum += sh1_get((tt * prm.group + h) * BK + c);
                    }
                }
                scores[prm.s_off + (u * prm.seq_q + t) * prm.np + p] = sum;
            }
        }
        // sh1 is rewritten only after the next tile's barriers.
    }
}

//#if ROWS
// Decoding's few rows (ROWS = seq_q · group, at most 8): the tiled product above wastes most
// of its smallest tile on them and re-reads the pooled keys in its second pass. Here a
// workgroup takes (split of the pooled keys, unit) and a thread a pooled key at a time, its
// row read once against all ROWS query rows (in workgroup memory). row_logits keeps the scaled
// logits (NEG: not a candidate of the row's token) and each row's max and sum of exp2 over the
// split; row_scores merges the splits and sums each token's group of probabilities (MoBA: of
// logits), reading the logits, not the keys, again.
@group(0) @binding(10) var<storage, read_write> lgt: array<f32>;

var<workgroup> sh_q: array<vec4<f32>, ROWS * D4>;
var<workgroup> sh_red: array<f32, ROWS * NT>;
var<workgroup> sh_lse: array<f32, ROWS>;

// Pooled keys [x, y) of split `split`.
fn row_split(split: u32) -> vec2<u32> {
    let pa = split * prm.split_np;
    return vec2<u32>(pa, min(pa + prm.split_np, prm.np));
}

// Tree reduction of sh_red's ROWS rows of NT (a power of two) by max or sum; row r's result
// lands in sh_red[r * NT]. Call in uniform control flow.
fn reduce_rows(tid: u32, take_max: bool) {
    for (var s = NT / 2u; s > 0u; s >>= 1u) {
        if (tid < s) {
            for (var r = 0u; r < ROWS; r++) {
                let a = sh_red[r * NT + tid];
                let b = sh_red[r * NT + tid + s];
                sh_red[r * NT + tid] = select(a + b, max(a, b), take_max);
            }
        }
        workgroupBarrier();
    }
}

// SG: LPK lanes of a subgroup per pooled key, lane c reading vec4s c, c + LPK, .. of its row,
// so that one load instruction covers whole rows (a thread per key touches a row per lane,
// every load a separate cache line); the partial dots meet by subgroup shuffles.
const LPK: u32 = 8u;

// Row r's scaled logit of pooled key p (NEG where the row's token does not score it), kept,
// and folded into the row's running (max, sum of exp2) `ml`.
fn keep_logit(u: u32, r: u32, p: u32, g: Unit, dot_qk: f32, ml: vec2<f32>) -> vec2<f32> {
    let cand = p < pooled_end(g, r / prm.group);
    let x = dot_qk * prm.scale;
    lgt[prm.lg_off + (u * ROWS + r) * prm.np + p] = select(NEG, x, cand);
    if (!cand) {
        return ml;
    }
    let y = x * LOG2E;
    let mx = max(ml.x, y);
    return vec2<f32>(mx, ml.y * exp2(ml.x - mx) + exp2(y - mx));
}

@compute @workgroup_size(NT)
fn row_logits(@builtin(workgroup_id) wg: vec3<u32>,
//#if SG
              @builtin(subgroup_id) sg: u32,
              @builtin(subgroup_size) sg_size: u32,
              @builtin(subgroup_invocation_id) lane: u32,
//#endif
              @builtin(local_invocation_index) tid: u32) {
    let u = wg.y;
    let split = wg.x;
    let g = unit_of(u);
    let span = row_split(split);
    for (var e = tid; e < ROWS * D4; e += NT) {
        let r = e / D4;
        let h = r % prm.group;
        let t = r / prm.group;
        sh_q[e] = fetch(0u, prm.q_off / 4u + ((u * prm.group + h) * prm.seq_q + t) * D4 + e % D4);
    }
    workgroupBarrier();
    var m: array<f32, ROWS>;
    var l: array<f32, ROWS>;
    for (var r = 0u; r < ROWS; r++) {
        m[r] = NEG;
        l[r] = 0.0;
    }
    let kb4 = prm.kb_off / 4u + u * prm.np * D4;
//#if SG
    // The host checks: NT a multiple of every subgroup size, subgroups of at least LPK lanes,
    // D4 a multiple of LPK. Key slot of this lane's group, unique in the workgroup.
    let c = lane % LPK;
    let slot = sg * (sg_size / LPK) + lane / LPK;
    // Subgroup-uniform trip count: every lane takes part in the shuffles.
    for (var p0 = span.x; p0 < span.y; p0 += NT / LPK) {
        let p = p0 + slot;
        let live = p < span.y;
        var acc: array<f32, ROWS>;
        for (var r = 0u; r < ROWS; r++) {
            acc[r] = 0.0;
        }
        if (live) {
            let base = kb4 + p * D4;
            for (var i = c; i < D4; i += LPK) {
                let kv = kbar[base + i];
                for (var r = 0u; r < ROWS; r++) {
                    acc[r] += dot(sh_q[r * D4 + i], kv);
                }
            }
        }
        for (var r = 0u; r < ROWS; r++) {
            for (var m = 1u; m < LPK; m <<= 1u) {
                acc[r] += subgroupShuffleXor(acc[r], m);
            }
        }
        // Lane c of the group keeps rows c, c + LPK, .. (static indices: registers).
        for (var r = 0u; r < ROWS; r++) {
            if (!live || r % LPK != c) {
                continue;
            }
            let ml = keep_logit(u, r, p, g, acc[r], vec2<f32>(m[r], l[r]));
            m[r] = ml.x;
            l[r] = ml.y;
        }
    }
//#else
    for (var p = span.x + tid; p < span.y; p += NT) {
        var acc: array<f32, ROWS>;
        for (var r = 0u; r < ROWS; r++) {
            acc[r] = 0.0;
        }
        let base = kb4 + p * D4;
        // Four loads in flight per round (D4 is a multiple of 4: head_dim of 16s).
        for (var i = 0u; i < D4; i += 4u) {
            let k0 = kbar[base + i];
            let k1 = kbar[base + i + 1u];
            let k2 = kbar[base + i + 2u];
            let k3 = kbar[base + i + 3u];
            for (var r = 0u; r < ROWS; r++) {
                let qb = r * D4 + i;
                acc[r] += dot(sh_q[qb], k0) + dot(sh_q[qb + 1u], k1) + dot(sh_q[qb + 2u], k2)
                    + dot(sh_q[qb + 3u], k3);
            }
        }
        for (var r = 0u; r < ROWS; r++) {
            let ml = keep_logit(u, r, p, g, acc[r], vec2<f32>(m[r], l[r]));
            m[r] = ml.x;
            l[r] = ml.y;
        }
    }
//#endif
    // The split's max per row, then the sums rescaled to it.
    for (var r = 0u; r < ROWS; r++) {
        sh_red[r * NT + tid] = m[r];
    }
    workgroupBarrier();
    reduce_rows(tid, true);
    var mx: array<f32, ROWS>;
    for (var r = 0u; r < ROWS; r++) {
        mx[r] = sh_red[r * NT];
    }
    workgroupBarrier();
    for (var r = 0u; r < ROWS; r++) {
        sh_red[r * NT + tid] = select(0.0, l[r] * exp2(m[r] - mx[r]), m[r] != NEG);
    }
    workgroupBarrier();
    reduce_rows(tid, false);
    if (tid < ROWS) {
        part[prm.pt_off / 2u + (u * ROWS + tid) * prm.n_split + split] =
            vec2<f32>(mx[tid], sh_red[tid * NT]);
    }
}

@compute @workgroup_size(NT)
fn row_scores(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let u = wg.y;
    let g = unit_of(u);
    let span = row_split(wg.x);
    let moba = prm.mode == 1u;
    if (tid < ROWS) {
        sh_lse[tid] = merged_lse2(prm.pt_off / 2u + (u * ROWS + tid) * prm.n_split);
    }
    workgroupBarrier();
    for (var p = span.x + tid; p < span.y; p += NT) {
        for (var t = 0u; t < prm.seq_q; t++) {
            var sum = NEG;
            if (p < pooled_end(g, t)) {
                sum = 0.0;
                for (var h = 0u; h < prm.group; h++) {
                    let r = t * prm.group + h;
                    let x = lgt[prm.lg_off + (u * ROWS + r) * prm.np + p];
                    sum += select(exp2(x * LOG2E - sh_lse[r]), x, moba);
                }
            }
            scores[prm.s_off + (u * prm.seq_q + t) * prm.np + p] = sum;
        }
    }
}
//#endif

// Bitonic sort of sh_key / sh_idx[0 .. p2) by `precedes` (best first): its compare-exchange.
fn bitonic_step(lo: u32, hi: u32, up: bool) {
    let ka = sh_key[lo];
    let ia = sh_idx[lo];
    let kb = sh_key[hi];
    let ib = sh_idx[hi];
    if (up == precedes(kb, ib, ka, ia)) {
        sh_key[lo] = kb;
        sh_idx[lo] = ib;
        sh_key[hi] = ka;
        sh_idx[hi] = ia;
    }
}

// Blocks per thread when a thread rebuilds the keys of blocks tid + n·NT.
const EPT: u32 = (NBP + NT - 1u) / NT;

@compute @workgroup_size(NT)
fn block_topk(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let row = wg.y * prm.grid_x + wg.x;
    if (row >= prm.units * prm.seq_q) {
        return;
    }
    let t = row % prm.seq_q;
    let g = unit_of(row / prm.seq_q);
    let cur = current_block(g, t);
    let end = candidate_end(g, cur);
    // Sort only the smallest power of two that holds the candidates.
    var p2 = 2u;
    while (p2 < end) {
        p2 <<= 1u;
    }
    let srow = prm.s_off + row * prm.np;
    let pend = pooled_end(g, t);
    for (var j = tid; j < p2; j += NT) {
        sh_key[j] = topk_key(g, srow, j, end, cur, pend);
        sh_idx[j] = j;
    }
    workgroupBarrier();
    bitonic(p2, tid);
//#if NOSA
    // The query-aware blocks (the first k - evict) stay first (FORCED); the other candidates
    // are ranked again by the eviction score and fill the selection to k.
    let nq = min(prm.k - prm.evict, end);
    let u = row / prm.seq_q;
    var keys: array<f32, EPT>;
    for (var n = 0u; n < EPT; n++) {
        let j = tid + n * NT;
        var x = PAD;
        if (j < end) {
            x = select(evict_score(g, u, j, pend), FORCED, chosen_first(j, nq));
        }
        keys[n] = x;
    }
    workgroupBarrier();
    for (var n = 0u; n < EPT; n++) {
        let j = tid + n * NT;
        if (j < p2) {
            sh_key[j] = keys[n];
            sh_idx[j] = j;
        }
    }
    workgroupBarrier();
    bitonic(p2, tid);
//#endif
    // The first min(k, candidates) entries are the selection.
    write_ascending(min(prm.k, end), row, tid);
}

// NOSA: the per-token eviction score mean-pooled over each window, like the keys (thread per
// (unit, window)).
@compute @workgroup_size(NT)
fn evict_pool(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
//#if NOSA
    let w = pool_window((wg.y * prm.grid_x + wg.x) * NT + tid);
    if (w.x == SENTINEL) {
        return;
    }
    let u = w.x;
    let p = w.y;
    let t0 = p * prm.pool_s;
    let t1 = min(t0 + prm.pool_w, prm.seq_k);
    var acc = 0.0;
    for (var t = t0; t < t1; t++) {
        acc += evict[prm.e_off + key_row(u, t)];
    }
    epool[prm.ep_off + u * prm.np + p] = acc / f32(t1 - t0);
//#endif
}
