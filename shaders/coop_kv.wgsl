// K and V staging shared by the cooperative-matrix kernels that walk keys tile by tile
// (attention_coop.wgsl, attention_coop_bwd.wgsl) or hold a key tile's fragments
// (attention_coop_bwd.wgsl's and sparse_coop_bwd.wgsl's dK/dV). Needs the k and v bindings,
// coop_tile.wgsl, and the constants BK, NT.

// vec4s of a BK-row K (and V) tile per invocation.
const NPW: u32 = (BK * D4 + NT - 1u) / NT;

// Rows [r0, r0 + BK) of K and V (from vec4 index k4; zero at or past `end`) into registers.
fn fetch_kv(pk: ptr<function, array<ST, NPW>>, pv: ptr<function, array<ST, NPW>>, k4: u32,
            r0: u32, end: u32, tid: u32) {
    for (var i = 0u; i < NPW; i++) {
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

// The fetched tile into the staging area: K rows [0, BK), V rows [BK, 2·BK). Between barriers.
fn put_kv(pk: ptr<function, array<ST, NPW>>, pv: ptr<function, array<ST, NPW>>, tid: u32) {
    workgroupBarrier();
    for (var i = 0u; i < NPW; i++) {
        let e = tid + i * NT;
        if (e < BK * D4) {
            let s = (e / D4) * DP + (e % D4) * 4u;
            put4(s, (*pk)[i]);
            put4(s + BK * DP, (*pv)[i]);
        }
    }
    workgroupBarrier();
}

// K, then V rows [key0, key0 + rows) (zero past seq_k) through the staging area into fragments:
// the 16 rows from `frag_row` of the staged tile.
fn kv_fragments(ka: ptr<function, array<MatA, DQ>>, va: ptr<function, array<MatA, DQ>>,
                k4: u32, key0: u32, rows: u32, frag_row: u32, tid: u32) {
    for (var t = 0u; t < 2u; t++) {
        workgroupBarrier();
        for (var e = tid; e < rows * D4; e += NT) {
            let r = e / D4;
            var x = ST(0.0);
            if (key0 + r < prm.seq_k) {
                let g = k4 + (key0 + r) * D4 + e % D4;
                x = select(v[g], k[g], t == 0u);
            }
            put4(r * DP + (e % D4) * 4u, x);
        }
        workgroupBarrier();
//#for I in 0..DQ
        let f{I} = coopLoadT<MatA>(&kv[(frag_row * DP + {I} * 16u) / 4u], DP4);
        if (t == 0u) {
            (*ka)[{I}] = f{I};
        } else {
            (*va)[{I}] = f{I};
        }
//#endfor
    }
}
