// What the selection kernels share (block_select.wgsl, block_topk_sg.wgsl): launch parameters,
// bindings, the candidate rules and the order of the top-k. Needs NEG (attn_params.wgsl) and
// the constant NOSA (1: the last `evict` blocks of each row are chosen by a pooled,
// query-agnostic eviction score after the query-aware ones; NOSA.md §2) and the constant
// VARLEN (1: decoding over caches of `seq_k` rows, each sequence holding lens[b] tokens; the
// seq_q queries are its last tokens; pooled keys and eviction scores are kept across steps and
// only the windows the newest n_new tokens complete are pooled).

// NEG (from common.wgsl) marks a pooled key that is not a candidate.
const PAD: f32 = -3.4e38;      // past the last block (sorts after NEG)
const FORCED: f32 = 3.0e38;    // forced blocks sort first
const SENTINEL: u32 = 0xffffffffu;

struct SelParams {
    seq_q: u32,
    seq_k: u32,
    q_pos0: u32,
    causal: u32,
    group: u32,
    nb: u32,
    k: u32,
    n_init: u32,
    n_local: u32,
    mode: u32,    // 0 SSA, 1 MoBA, 2 InfLLM-V2
    scale: f32,
    grid_x: u32,
    q_off: u32,   // element offsets inside the bindings (multiples of 4)
    k_off: u32,
    kb_off: u32,
    s_off: u32,
    i_off: u32,
    units: u32,   // (batch, kv-head) groups in this launch
    np: u32,      // pooled keys (= nb except for InfLLM-V2)
    pool_w: u32,  // pooling window and stride in tokens
    pool_s: u32,
    evict: u32,   // NOSA: blocks chosen by the eviction score
    e_off: u32,   // NOSA: offsets of the per-token eviction score and of its pooled windows
    ep_off: u32,
    u0: u32,      // VARLEN: first unit of the launch, kv heads per sequence (lens index),
    heads_kv: u32,
    n_new: u32,   //   tokens appended since the last pooling, and windows they may complete
    pool_new: u32,
    n_split: u32, // block scores: pooled-key splits per row, pooled keys per split (a multiple
    split_np: u32, //   of BK), and the offset of the splits' statistics (block_lse)
    pt_off: u32,
    ring: u32,    // VARLEN: rows of k and of the eviction score per unit when they are a ring of
                  //   the recent tokens (token t in row t % ring), else 0 (token t in row t)
    lg_off: u32,  // ROWS: offset of the rows' logits (row_logits)
}

@group(0) @binding(0) var<uniform> prm: SelParams;
@group(0) @binding(1) var<storage, read> q: array<ST>;
@group(0) @binding(2) var<storage, read> k: array<ST>;
@group(0) @binding(3) var<storage, read_write> kbar: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> scores: array<f32>;
@group(0) @binding(5) var<storage, read_write> sel: array<u32>;
//#if NOSA
@group(0) @binding(6) var<storage, read> evict: array<f32>;
@group(0) @binding(7) var<storage, read_write> epool: array<f32>;
//#endif
//#if VARLEN
@group(0) @binding(8) var<storage, read> lens: array<u32>;
//#endif

// The geometry of a unit: the launch's, or (VARLEN) its sequence's length, clamped to
// [seq_q, seq_k] so that no index leaves the buffers whatever lens holds. Passed by value (a
// module-scope variable would make every barrier after it non-uniform to Tint's analysis).
struct Unit {
    len: u32,
    q_pos0: u32,
    nb: u32,
    np: u32,
}

fn unit_of(u: u32) -> Unit {
//#if VARLEN
    let len = clamp(lens[(prm.u0 + u) / prm.heads_kv], prm.seq_q, prm.seq_k);
    return Unit(len, len - prm.seq_q, (len + BLK - 1u) / BLK, (len + prm.pool_s - 1u) / prm.pool_s);
//#else
    return Unit(prm.seq_k, prm.q_pos0, prm.nb, prm.np);
//#endif
}

// The row of token t of unit u in k and in the eviction score.
fn key_row(u: u32, t: u32) -> u32 {
    if (prm.ring == 0u) {
        return u * prm.seq_k + t;
    }
    return u * prm.ring + t % prm.ring;
}

// Windows whose every key lies in the first `len` tokens.
fn complete_windows(len: u32) -> u32 {
    if (len < prm.pool_w) {
        return 0u;
    }
    return (len - prm.pool_w) / prm.pool_s + 1u;
}

fn current_block(g: Unit, t: u32) -> u32 {
    return min((g.q_pos0 + t) / BLK, g.nb - 1u);
}

fn candidate_end(g: Unit, cur: u32) -> u32 {
    return select(g.nb, cur + 1u, prm.causal != 0u);
}

fn is_forced(cur: u32, j: u32) -> bool {
    return j == cur || j < prm.n_init || (j < cur && cur - j <= prm.n_local);
}

// Pooled keys token t scores: causal, only the complete windows (every key at or before the
// token: no future key steers the choice, and prefill selects as decoding will); else all.
fn pooled_end(g: Unit, t: u32) -> u32 {
    if (prm.causal == 0u) {
        return g.np;
    }
    return min(g.np, complete_windows(g.q_pos0 + t + 1u));
}

// Score of block j: its pooled score, or (InfLLM-V2) the max over the candidate kernels that
// overlap it. `pend` = candidate pooled keys of the row.
fn block_score(g: Unit, srow: u32, j: u32, pend: u32) -> f32 {
    if (prm.mode != 2u) {
        return scores[srow + j];
    }
    let w = block_windows(g, j, pend);
    var best = NEG;
    for (var m = w.x; m < w.y; m++) {
        best = max(best, scores[srow + m]);
    }
    return best;
}

// Pooled windows lo..hi (exclusive) that score block j for InfLLM-V2: the scored windows
// (below pend) that overlap it.
fn block_windows(g: Unit, j: u32, pend: u32) -> vec2<u32> {
    let start = j * BLK;
    var lo = 0u;
    if (start >= prm.pool_w) {
        lo = (start - prm.pool_w) / prm.pool_s + 1u;
    }
    return vec2<u32>(lo, min(min((start + BLK + prm.pool_s - 1u) / prm.pool_s, g.np), pend));
}

//#if NOSA
// NOSA's eviction score of block j in unit u (pooled like the keys: the block's window, or the
// max over the scored windows overlapping it); NEG where no window is scored, and for NaN.
fn evict_score(g: Unit, u: u32, j: u32, pend: u32) -> f32 {
    let base = prm.ep_off + u * prm.np;
    var best = NEG;
    if (prm.mode != 2u) {
        if (j < pend) {
            best = epool[base + j];
        }
    } else {
        let w = block_windows(g, j, pend);
        for (var m = w.x; m < w.y; m++) {
            best = max(best, epool[base + m]);
        }
    }
    return select(best, NEG, best != best);
}

// Was block j among the first n entries of sh_idx (the query-aware choice)?
fn chosen_first(j: u32, n: u32) -> bool {
    for (var s = 0u; s < n; s++) {
        if (sh_idx[s] == j) {
            return true;
        }
    }
    return false;
}
//#endif

// Does (ka, ia) come before (kb, ib)? Higher key first, then the lower index.
fn precedes(ka: f32, ia: u32, kb: f32, ib: u32) -> bool {
    return ka > kb || (ka == kb && ia < ib);
}

// Sort key of block j for the top-k: FORCED for forced blocks, PAD past the candidates.
fn topk_key(g: Unit, srow: u32, j: u32, end: u32, cur: u32, pend: u32) -> f32 {
    if (j >= end) {
        return PAD;
    }
    return select(block_score(g, srow, j, pend), FORCED, is_forced(cur, j));
}

// The chosen blocks, best first (the top-k kernels fill it).
var<workgroup> sh_idx: array<u32, NBP>;

// Write the first n entries of sh_idx to the row's selection in ascending order, and SENTINEL
// after them. Call after a barrier.
fn write_ascending(n: u32, row: u32, tid: u32) {
    let out = prm.i_off + row * prm.k;
    for (var s = tid; s < prm.k; s += NT) {
        if (s < n) {
            let idx = sh_idx[s];
            var rank = 0u;
            for (var r = 0u; r < n; r++) {
                rank += select(0u, 1u, sh_idx[r] < idx);
            }
            sel[out + rank] = idx;
        } else {
            sel[out + s] = SENTINEL;
        }
    }
}
