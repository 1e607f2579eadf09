// A token's key list, shared by the cooperative-matrix sparse kernels (sparse_coop.wgsl,
// sparse_coop_bwd.wgsl): the token's selected blocks walked as one list of keys, BK per step,
// each subgroup staging its own rows. Needs prm (Params), the k, v, sel and bias bindings,
// coop_tile.wgsl, and the constants BLK, HAS_BIAS.

// vec4s of one step's K (and V) rows per lane.
const NPF: u32 = BK * D4 / 32u;
// Halves of one subgroup's staging area: K rows [0, BK), V rows [BK, 2·BK) (Q or dO rows go
// there first).
const STAGE: u32 = 2u * BK * DP;
const NO_KEY: u32 = 0xffffffffu;

// Where a (token, batch x kv head) finds its data. A token past the last (`live` false) still
// takes part in every step (uniform control flow) with nothing visible, and writes nothing.
struct Token {
    t: u32,
    u: u32,
    live: bool,
    kv_len: u32,   // keys it may see
    nb: u32,       // blocks of the key sequence
    q4: u32,       // vec4 index of head 0 of the group at this token; head h at q4 + h·qstride
    qstride: u32,
    k4: u32,       // vec4 index of key 0 of the kv head
    sel0: u32,     // its selection entries
    bias0: u32,    // its kv head's per-key bias
}

fn token_of(t: u32, u: u32) -> Token {
    return Token(
        t,
        u,
        t < prm.seq_q,
        select(prm.seq_k, min(prm.seq_k, prm.q_pos0 + t + 1u), prm.causal != 0u),
        (prm.seq_k + BLK - 1u) / BLK,
        (prm.q_off + (u * prm.group * prm.seq_q + t) * D) / 4u,
        prm.seq_q * D4,
        (prm.k_off + u * prm.seq_k * D) / 4u,
        prm.i_off + (u * prm.seq_q + t) * prm.nsel,
        prm.b_off + u * prm.seq_k,
    );
}

// The keys of list positions [i0, i0 + BK), a step: a 16-key chunk lies in one block (blocks
// are multiples of 16 keys), so one selection read per chunk gives its first key, and a column
// adds its offset (`step_key`). Reading the selection per column instead cost 8 dependent loads
// per lane and step.
alias StepKeys = array<u32, NJ>;

// The first key of each chunk of the step at `i0` (a multiple of 16), or NO_KEY where the chunk
// has none: past the list, a sentinel or out-of-range block, or past what the token may see.
fn step_keys(tk: ptr<function, Token>, i0: u32) -> StepKeys {
    var keys: StepKeys;
    for (var j = 0u; j < NJ; j++) {
        let i = i0 + j * 16u;
        keys[j] = NO_KEY;
        if ((*tk).live && i < prm.nsel * BLK) {
            let blk = sel[(*tk).sel0 + i / BLK];
            let key = blk * BLK + i % BLK;
            if (blk < (*tk).nb && key < (*tk).kv_len) {
                keys[j] = key;
            }
        }
    }
    return keys;
}

// The key at column `col` of the step (< BK), or NO_KEY where there is none.
fn step_key(tk: ptr<function, Token>, keys: ptr<function, StepKeys>, col: u32) -> u32 {
    // Constant indices once unrolled (a computed index would put `keys` in local memory).
    var first = NO_KEY;
    for (var j = 0u; j < NJ; j++) {
        first = select(first, (*keys)[j], col / 16u == j);
    }
    let key = first + col % 16u;
    return select(NO_KEY, key, first != NO_KEY && key < (*tk).kv_len);
}

// The per-key bias in log2 units (0 without one or without a key).
fn key_bias(tk: ptr<function, Token>, key: u32) -> f32 {
//#if HAS_BIAS
    if (key != NO_KEY) {
        return bias[(*tk).bias0 + key] * LOG2E;
    }
//#endif
    return 0.0;
}

// The K and V rows of list positions [i0, i0 + BK) into registers (zero rows where there is
// no key); `put_step` stores them. The forward fetches the next step's rows before this step's
// products, so their loads are in flight meanwhile.
fn fetch_step(tk: ptr<function, Token>, i0: u32, lane: u32, pk: ptr<function, array<ST, NPF>>,
              pv: ptr<function, array<ST, NPF>>) -> StepKeys {
    var keys = step_keys(tk, i0);
    for (var i = 0u; i < NPF; i++) {
        let e = lane + i * 32u;
        let key = step_key(tk, &keys, e / D4);
        var a = ST(0.0);
        var b = ST(0.0);
        if (key != NO_KEY) {
            let g = (*tk).k4 + key * D4 + e % D4;
            a = k[g];
            b = v[g];
        }
        (*pk)[i] = a;
        (*pv)[i] = b;
    }
    return keys;
}

// Fetched rows into the subgroup's staging area at `st`, between barriers (the subgroup's own
// where SG_SYNC = 1).
fn put_step(st: u32, lane: u32, pk: ptr<function, array<ST, NPF>>,
            pv: ptr<function, array<ST, NPF>>) {
    sg_sync();
    for (var i = 0u; i < NPF; i++) {
        let e = lane + i * 32u;
        let s = st + (e / D4) * DP + (e % D4) * 4u;
        put4(s, (*pk)[i]);
        put4(s + BK * DP, (*pv)[i]);
    }
    sg_sync();
}

// Both at once: all loads first, then the stores; returns the step's keys.
fn stage_step(tk: ptr<function, Token>, i0: u32, st: u32, lane: u32) -> StepKeys {
    var pk: array<ST, NPF>;
    var pv: array<ST, NPF>;
    let keys = fetch_step(tk, i0, lane, &pk, &pv);
    put_step(st, lane, &pk, &pv);
    return keys;
}
