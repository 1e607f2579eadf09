// Bitonic sorting network over entries [0, p2) (p2 a power of two) of an includer's workgroup
// arrays, NT invocations. The includer defines `fn bitonic_step(lo: u32, hi: u32, up: bool)`:
// compare entries lo < hi and swap them unless the one that should come first (in an ascending
// run when `up`, else a descending one) is at lo. Call in uniform control flow.
fn bitonic(p2: u32, tid: u32) {
    for (var size = 2u; size <= p2; size <<= 1u) {
        for (var stride = size / 2u; stride > 0u; stride >>= 1u) {
            for (var i = tid; i < p2 / 2u; i += NT) {
                let lo = 2u * stride * (i / stride) + i % stride;
                bitonic_step(lo, lo + stride, (lo & size) == 0u);
            }
            workgroupBarrier();
        }
    }
}
