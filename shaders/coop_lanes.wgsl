// How the cooperative-matrix kernels' 32 lanes split a subgroup's 16-row tile in workgroup
// memory: lane l owns row l/2 and the columns of parity l%2, its c-th value at column
// lane_col(c, n, r, half) of n per lane. The f32 scratch's row stride SP = BK + SPAD words is
// 4 or 8 mod 32 (an odd multiple), so with the plain mapping (column 2c + half) rows 8 (or 4)
// apart share banks and every read took two (four) passes; here each group of LROWS rows starts
// one column pair later than the group before, and the 32 lanes fall in 32 banks (the f16 P
// tile, PP = BK + 8 halves, likewise). SPAD 8 also spreads the accumulators' stores. H200, 8192,
// d 128, causal: dense forward 14.23 -> 13.31 ms with SPAD 4, 13.06 with SPAD 8
// (bench/results/h200-lanes-2026-12-02/). The shift costs integer work per value: the block
// scores (a lighter softmax) were slower with it and keep the plain mapping.
const LROWS: u32 = select(8u, 4u, SPAD == 8u);

fn lane_col(c: u32, n: u32, r: u32, half: u32) -> u32 {
    return 2u * ((c + r / LROWS) % n) + half;
}
