// The per-key bias of kv head `kvh` (chunk-local) at key `c`, in log2 units: 0 without a bias
// (HAS_BIAS = 0, no `bias` binding then) or past the keys. Needs HAS_BIAS.
//#if HAS_BIAS
fn key_bias(kvh: u32, c: u32) -> f32 {
    if (c < prm.seq_k) {
        return bias[prm.b_off + kvh * prm.seq_k + c] * LOG2E;
    }
    return 0.0;
}
//#else
fn key_bias(kvh: u32, c: u32) -> f32 {
    return 0.0;
}
//#endif
