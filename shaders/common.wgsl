// Shared by the attention kernels. The loader (src/gpu/pipeline.rs) prepends the tile constants
// from the launcher (src/ops/attention.rs):
//   D    head dim             BQ, BK  query / key rows per tile     NT  threads per workgroup
//   TM   rows per thread      TC      threads per row (TR = rows / TM thread rows)
//   TN   logit columns per thread (columns tx + TC*j)
//   TD4  output vec4 columns per thread (vec4 columns tx + TC*j), D = 4 * TC * TD4
//   DC   head dims staged per step (DCV = DC / 4 vec4), staged rows have stride DSV vec4
//        (DCV + 1: rows 16 bytes apart in bank space, so vec4 reads never conflict)
//   PC   inner rows staged per step of the second product (multiple of 4)
//   SH0, SH1, SH2  workgroup array sizes in vec4

//#include "attn_params.wgsl"

var<workgroup> sh0: array<vec4<f32>, SH0>;
var<workgroup> sh1: array<vec4<f32>, SH1>;
var<workgroup> sh2: array<vec4<f32>, SH2>;

fn sh1_set(i: u32, x: f32) {
    sh1[i / 4u][i % 4u] = x;
}
fn sh2_set(i: u32, x: f32) {
    sh2[i / 4u][i % 4u] = x;
}
fn sh0_set(i: u32, x: f32) {
    sh0[i / 4u][i % 4u] = x;
}
fn sh1_get(i: u32) -> f32 {
    return sh1[i / 4u][i % 4u];
}
fn sh2_get(i: u32) -> f32 {
    return sh2[i / 4u][i % 4u];
}

// c + a·b as four fused multiply-adds (dot() then add costs a multiply and an add more).
fn dot_acc(a: vec4<f32>, b: vec4<f32>, c: f32) -> f32 {
    return fma(a.w, b.w, fma(a.z, b.z, fma(a.y, b.y, fma(a.x, b.x, c))));
}

// acc + p.x*r0 + p.y*r1 + p.z*r2 + p.w*r3 as sixteen fused multiply-adds.
fn axpy4(p: vec4<f32>, r0: vec4<f32>, r1: vec4<f32>, r2: vec4<f32>, r3: vec4<f32>,
         acc: vec4<f32>) -> vec4<f32> {
    return fma(vec4<f32>(p.w), r3, fma(vec4<f32>(p.z), r2,
        fma(vec4<f32>(p.y), r1, fma(vec4<f32>(p.x), r0, acc))));
}

// Sum or max of the TC per-thread partials of row `r`, stored as scalars at sh0[r*TC ..]
// (TC is a multiple of 4: read them as vec4).
fn row_max(r: u32, init: f32) -> f32 {
    var m = init;
    for (var x = 0u; x < TC / 4u; x++) {
        let w = sh0[r * (TC / 4u) + x];
        m = max(m, max(max(w.x, w.y), max(w.z, w.w)));
    }
    return m;
}
fn row_sum(r: u32) -> f32 {
    var t = 0.0;
    for (var x = 0u; x < TC / 4u; x++) {
        let w = sh0[r * (TC / 4u) + x];
        t += (w.x + w.y) + (w.z + w.w);
    }
    return t;
}

// Staging: each kernel file defines `fetch(which: u32, g: u32) -> vec4<f32>`, which reads its
// tensor number `which` at vec4 index `g`.

// Rows [r0, r0 + n) x vec4 dims [d0v, d0v + DCV) of a tensor into sh0 rows at..at+n (stride DSV);
// rows at or past `len` read as zero. Rows are `stride4` vec4 apart in the tensor.
fn stage_strided(which: u32, at: u32, base4: u32, stride4: u32, r0: u32, n: u32, len: u32,
                 d0v: u32, tid: u32) {
    for (var e = tid; e < n * DCV; e += NT) {
        let r = e / DCV;
        var x = vec4<f32>(0.0);
        if (r0 + r < len) {
            x = fetch(which, base4 + (r0 + r) * stride4 + d0v + e % DCV);
        }
        sh0[(at + r) * DSV + e % DCV] = x;
    }
}

// The same for contiguous rows of D values.
fn stage_chunk(which: u32, at: u32, base4: u32, r0: u32, n: u32, len: u32, d0v: u32, tid: u32) {
    stage_strided(which, at, base4, D4, r0, n, len, d0v, tid);
}

// PC whole rows [r0, r0 + PC) of a tensor into sh0 at vec4 offset `at` (stride D4).
fn stage_rows(which: u32, at: u32, base4: u32, r0: u32, len: u32, tid: u32) {
    for (var e = tid; e < PC * D4; e += NT) {
        var x = vec4<f32>(0.0);
        if (r0 + e / D4 < len) {
            x = fetch(which, base4 + r0 * D4 + e);
        }
        sh0[at + e] = x;
    }
}

// The same for rows `stride4` vec4 apart (the query heads of one token).
fn stage_rows_strided(which: u32, at: u32, base4: u32, stride4: u32, r0: u32, len: u32,
                      tid: u32) {
    for (var e = tid; e < PC * D4; e += NT) {
        var x = vec4<f32>(0.0);
        let r = r0 + e / D4;
        if (r < len) {
            x = fetch(which, base4 + r * stride4 + e % D4);
        }
        sh0[at + e] = x;
    }
}

alias Logits = array<f32, TM * TN>;
alias Acc = array<vec4<f32>, TM * TD4>;

// The first product of every kernel, one staged chunk of DC dims:
// s[i][j] += sh0 row (ra + ty*TM + i) · sh0 row (rb + tx + TC*j), rows of stride DSV.
fn logits_acc(s: ptr<function, Logits>, ra: u32, rb: u32, ty: u32, tx: u32) {
    for (var dv = 0u; dv < DCV; dv++) {
        var a: array<vec4<f32>, TM>;
        for (var i = 0u; i < TM; i++) {
            a[i] = sh0[(ra + ty * TM + i) * DSV + dv];
        }
        for (var j = 0u; j < TN; j++) {
            let b = sh0[(rb + tx + TC * j) * DSV + dv];
            for (var i = 0u; i < TM; i++) {
                (*s)[i * TN + j] = dot_acc(a[i], b, (*s)[i * TN + j]);
            }
        }
    }
}

// The second product of every kernel, one staged chunk of PC inner rows:
// acc[i][j] += Σ_c W[ty*TM + i][w0 + c] · sh0[b_at + c*D4 + tx + TC*j], where W is sh1
// (which = 1) or sh2 (which = 2) holding scalars with row stride w_stride.
fn rows_acc(acc: ptr<function, Acc>, which: u32, w_stride: u32, w0: u32, b_at: u32, ty: u32,
            tx: u32) {
    for (var c = 0u; c < PC; c += 4u) {
        var w: array<vec4<f32>, TM>;
        for (var i = 0u; i < TM; i++) {
            let at = ((ty * TM + i) * w_stride + w0 + c) / 4u;
            if (which == 1u) {
                w[i] = sh1[at];
            } else {
                w[i] = sh2[at];
            }
        }
        for (var j = 0u; j < TD4; j++) {
            let col = b_at + c * D4 + tx + TC * j;
            let r0 = sh0[col];
            let r1 = sh0[col + D4];
            let r2 = sh0[col + 2u * D4];
            let r3 = sh0[col + 3u * D4];
            for (var i = 0u; i < TM; i++) {
                (*acc)[i * TD4 + j] = axpy4(w[i], r0, r1, r2, r3, (*acc)[i * TD4 + j]);
            }
        }
    }
}

alias Rows = array<f32, TM>;

// The totals over each tile row's TC threads of one partial per thread row (`part[i]` for row
// ty*TM + i), summed in a fixed order through sh1 (no atomics: deterministic). Valid in the
// threads with tx == 0. Holds workgroup barriers: call from uniform control flow, after the
// last use of sh1, in kernels whose sh1 holds at least rows x TC scalars (the dK/dV kernels:
// rows x cols with cols >= TC).
fn row_totals(part: ptr<function, Rows>, ty: u32, tx: u32) -> Rows {
    workgroupBarrier();
    for (var i = 0u; i < TM; i++) {
        sh1_set((ty * TM + i) * TC + tx, (*part)[i]);
    }
    workgroupBarrier();
    var t: Rows;
    for (var i = 0u; i < TM; i++) {
        t[i] = 0.0;
        if (tx == 0u) {
            for (var x = 0u; x < TC; x++) {
                t[i] += sh1_get((ty * TM + i) * TC + x);
            }
        }
    }
    return t;
}

// Running softmax state of a thread's TM rows: max m (log2 domain), its own columns' share l of
// the denominator, and the unnormalised output acc.
fn online_init(m: ptr<function, Rows>, l: ptr<function, Rows>, acc: ptr<function, Acc>) {
    for (var i = 0u; i < TM; i++) {
        (*m)[i] = NEG;
        (*l)[i] = 0.0;
    }
    for (var i = 0u; i < TM * TD4; i++) {
        (*acc)[i] = vec4<f32>(0.0);
    }
}

// One key tile of the forward pass. `s` holds the tile's logits, scaled to the log2 domain and
// NEG where masked. Updates the row maxima (reduced across the TC threads of a row), writes P to
// sh1, rescales the output and adds P V, with V rows [key0, key0 + BK) of tensor `which_v`
// staged PC at a time (rows at or past `kv_len` read as zero).
fn online_tile(m: ptr<function, Rows>, l: ptr<function, Rows>, acc: ptr<function, Acc>,
               s: ptr<function, Logits>, which_v: u32, k4: u32, key0: u32, kv_len: u32,
               tid: u32, ty: u32, tx: u32) {
    online_softmax(m, l, acc, s, ty, tx);
    for (var c0 = 0u; c0 < BK; c0 += PC) {
        stage_rows(which_v, 0u, k4, key0 + c0, kv_len, tid);
        workgroupBarrier();
        rows_acc(acc, 1u, BK, c0, 0u, ty, tx);
        workgroupBarrier();
    }
}

// The softmax half of `online_tile`: new maxima, P in sh1 (visible after its final barrier),
// rescaled denominators and outputs.
fn online_softmax(m: ptr<function, Rows>, l: ptr<function, Rows>, acc: ptr<function, Acc>,
                  s: ptr<function, Logits>, ty: u32, tx: u32) {
    for (var i = 0u; i < TM; i++) {
        var mx = NEG;
        for (var j = 0u; j < TN; j++) {
            mx = max(mx, (*s)[i * TN + j]);
        }
        sh0_set((ty * TM + i) * TC + tx, mx);
    }
    workgroupBarrier();
    for (var i = 0u; i < TM; i++) {
        let r = ty * TM + i;
        let mt = row_max(r, (*m)[i]);
        let alpha = exp2((*m)[i] - mt);
        (*m)[i] = mt;
        var ls = 0.0;
        for (var j = 0u; j < TN; j++) {
            let x = (*s)[i * TN + j];
            let p = select(0.0, exp2(x - mt), x != NEG);
            sh1_set(r * BK + tx + TC * j, p);
            ls += p;
        }
        (*l)[i] = (*l)[i] * alpha + ls;
        for (var j = 0u; j < TD4; j++) {
            (*acc)[i * TD4 + j] *= alpha;
        }
    }
    workgroupBarrier();
}

// Register prefetch: a thread's share of a staging step, loaded into registers one step ahead
// so the global loads overlap the previous step's arithmetic instead of stalling before a barrier.
const QPT: u32 = (BQ * DCV + NT - 1u) / NT;
const KPT: u32 = (BK * DCV + NT - 1u) / NT;
const VPT: u32 = (PC * D4 + NT - 1u) / NT;
alias ChunkRegs = array<vec4<f32>, KPT>;
alias RowsRegs = array<vec4<f32>, VPT>;

// What `stage_chunk(which, at, base4, r0, BK, len, d0v, tid)` stages, in registers.
fn chunk_load(which: u32, base4: u32, r0: u32, len: u32, d0v: u32, tid: u32) -> ChunkRegs {
    var x: ChunkRegs;
    for (var n = 0u; n < KPT; n++) {
        let e = tid + n * NT;
        x[n] = vec4<f32>(0.0);
        if (e < BK * DCV && r0 + e / DCV < len) {
            x[n] = fetch(which, base4 + (r0 + e / DCV) * D4 + d0v + e % DCV);
        }
    }
    return x;
}

fn chunk_store(at: u32, x: ptr<function, ChunkRegs>, tid: u32) {
    for (var n = 0u; n < KPT; n++) {
        let e = tid + n * NT;
        if (e < BK * DCV) {
            sh0[(at + e / DCV) * DSV + e % DCV] = (*x)[n];
        }
    }
}

// What `stage_strided(which, at, base4, stride4, 0, BQ, len, d0v, tid)` stages, in registers.
fn strided_load(which: u32, base4: u32, stride4: u32, len: u32, d0v: u32, tid: u32)
    -> array<vec4<f32>, QPT> {
    var x: array<vec4<f32>, QPT>;
    for (var n = 0u; n < QPT; n++) {
        let e = tid + n * NT;
        x[n] = vec4<f32>(0.0);
        if (e < BQ * DCV && e / DCV < len) {
            x[n] = fetch(which, base4 + (e / DCV) * stride4 + d0v + e % DCV);
        }
    }
    return x;
}

fn strided_store(at: u32, x: ptr<function, array<vec4<f32>, QPT>>, tid: u32) {
    for (var n = 0u; n < QPT; n++) {
        let e = tid + n * NT;
        if (e < BQ * DCV) {
            sh0[(at + e / DCV) * DSV + e % DCV] = (*x)[n];
        }
    }
}

// What `stage_rows(which, at, base4, r0, len, tid)` stages, in registers.
fn rows_load(which: u32, base4: u32, r0: u32, len: u32, tid: u32) -> RowsRegs {
    var x: RowsRegs;
    for (var n = 0u; n < VPT; n++) {
        let e = tid + n * NT;
        x[n] = vec4<f32>(0.0);
        if (e < PC * D4 && r0 + e / D4 < len) {
            x[n] = fetch(which, base4 + r0 * D4 + e);
        }
    }
    return x;
}

// acc += W · rows [key0, key0 + BK) of tensor `which_v` (W: scalars in sh1, row stride BK), the
// rows staged PC at a time from registers one step ahead; `x` holds the first step, loaded by
// the caller early (e.g. before its softmax) so the loads overlap that work too.
fn rows_product(acc: ptr<function, Acc>, x: ptr<function, RowsRegs>, which_v: u32, k4: u32,
                key0: u32, kv_len: u32, tid: u32, ty: u32, tx: u32) {
    for (var c0 = 0u; c0 < BK; c0 += PC) {
        rows_store(0u, x, tid);
        workgroupBarrier();
        if (c0 + PC < BK) {
            *x = rows_load(which_v, k4, key0 + c0 + PC, kv_len, tid);
        }
        rows_acc(acc, 1u, BK, c0, 0u, ty, tx);
        workgroupBarrier();
    }
}

fn rows_store(at: u32, x: ptr<function, RowsRegs>, tid: u32) {
    for (var n = 0u; n < VPT; n++) {
        let e = tid + n * NT;
        if (e < PC * D4) {
            sh0[at + e] = (*x)[n];
        }
    }
}

// Full denominators: afterwards row_sum(r) gives row r's total (call in uniform control flow).
fn online_totals(l: ptr<function, Rows>, ty: u32, tx: u32) {
    for (var i = 0u; i < TM; i++) {
        sh0_set((ty * TM + i) * TC + tx, (*l)[i]);
    }
    workgroupBarrier();
}
