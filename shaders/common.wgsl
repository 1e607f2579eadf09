// Shared by the attention kernels. Constants (D, BQ, BK, TM, TC, TR, NT, TN, TD, DC, DCP, PC, SH*)
// are prepended by the loader (src/gpu/pipeline.rs) from the launcher's tile configuration.

// Masked logits hold exactly this value; compare with `!=` (no infinities in flight).
const NEG: f32 = -3.0e38;
const LOG2E: f32 = 1.4426950408889634;
const LN2: f32 = 0.6931471805599453;

// One launch covers a chunk of (batch, kv-head) groups. Offsets are in elements, relative to the
// start of each binding (the launcher binds 256-byte-aligned windows of larger buffers).
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
}
