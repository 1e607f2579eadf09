// The launch parameters every attention kernel reads, and the masking rules they share
// (included by common.wgsl and by the cooperative-matrix kernels). Needs the constant BQ.

// Masked logits hold exactly this value; compare with `!=` (no infinities in flight).
const NEG: f32 = -3.0e38;
const LOG2E: f32 = 1.4426950408889634;
const LN2: f32 = 0.6931471805599453;
const D4: u32 = D / 4u;

// One launch covers a chunk of (batch, kv-head) groups. Offsets are in elements (multiples of 4),
// relative to the start of each binding (the launcher binds 256-byte-aligned windows).
struct Params {
    seq_q: u32,
    seq_k: u32,
    q_pos0: u32,     // absolute position of query 0 (seq_k - seq_q)
    causal: u32,
    group: u32,      // query heads per kv head
    q_off: u32,      // offset of q-shaped tensors (q, o, dO, dQ)
    k_off: u32,      // offset of kv-shaped tensors (k, v, dK, dV)
    r_off: u32,      // offset of per-row tensors (LSE, D)
    scale_log2: f32, // scale * log2(e): logits live in the log2 domain
    scale: f32,
    grid_x: u32,     // workgroups along x (flattened 2-D grids)
    rows: u32,       // rows in this launch (rowdot)
    nsel: u32,       // sparse: selected blocks per (token, kv head)
    i_off: u32,      // sparse: offset of the selection
    b_off: u32,      // sparse: offset of the per-key bias
    _pad: u32,
}

// Last key (exclusive) any query of rows [row0, row0 + BQ) may see.
fn key_end(row0: u32) -> u32 {
    if (prm.causal == 0u) {
        return prm.seq_k;
    }
    return min(prm.seq_k, prm.q_pos0 + min(row0 + BQ, prm.seq_q));
}

// Is key `c` visible to query row `r`?
fn visible(r: u32, c: u32) -> bool {
    return c < prm.seq_k && r < prm.seq_q && (prm.causal == 0u || c <= prm.q_pos0 + r);
}
