#!/usr/bin/env python3
"""Peer benchmark: PyTorch on the same GPU and shapes as our kernels, one table.

Run by bench/peers.sh, which first times our kernels (`sparse-attn bench ... --json`) and passes
their records here. Peers, fp16, causal, forward and backward:
  - dense:  torch.nn.functional.scaled_dot_product_attention, flash backend;
  - sparse: FlexAttention (torch.compile'd) with a block mask of the same density as ours, and
            the NSA selected-block Triton kernel of fla-core (ParallelNSAFunction) at SSA's
            settings (block 16, k 16, GQA 16:1), given random causal block indices.
Timing: CUDA events around N calls after warm-up, the median of 5 such runs.
FLOPs: 4·d per attended (query, key) pair forward, 2.5x that backward (FlashAttention's
convention, as our benchmarks count). Dense-equivalent = causal dense FLOPs / time.
"""
import argparse
import json
import sys
import time

DEV = "cuda"


def timed(fn, reps=None, target_s=0.25):
    """Median seconds per call of fn() (CUDA events, several calls per measurement)."""
    import torch
    fn()
    torch.cuda.synchronize()
    if reps is None:
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        one = max(time.perf_counter() - t0, 1e-5)
        reps = max(1, min(200, int(target_s / one)))
    out = []
    for _ in range(5):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            fn()
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b) / 1e3 / reps)
    out.sort()
    return out[len(out) // 2]


def time_fwd_bwd(fwd, inputs):
    """Seconds of fwd(), then of the backward of its output for a random dO (grads of inputs)."""
    import torch
    o = fwd()
    do = torch.randn_like(o)
    tf = timed(fwd)
    o = fwd()
    tb = timed(lambda: torch.autograd.grad(o, inputs, do, retain_graph=True))
    return tf, tb


def causal_pairs(s):
    return s * (s + 1) // 2


def sparse_pairs(s, block, k):
    """(query, key) pairs when every token keeps k blocks incl. its own (partial) block."""
    total = 0
    for p in range(s):
        cur = p // block
        if cur + 1 <= k:
            total += p + 1
        else:
            total += (k - 1) * block + p % block + 1
    return total


def bench_sdpa(b, h, s, d):
    import torch
    import torch.nn.functional as F
    q, k, v = (torch.randn(b, h, s, d, device=DEV, dtype=torch.float16, requires_grad=True)
               for _ in range(3))
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return time_fwd_bwd(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                            (q, k, v))


def random_block_indices(b, hkv, s, block, k, gen):
    """[b, s, hkv, k] int32: the token's own block plus k-1 distinct earlier ones (-1 where a
    token has fewer blocks), ascending, like a causal top-k selection."""
    import torch
    nb = (s + block - 1) // block
    cur = torch.arange(s, device=DEV) // block                       # [s]
    r = torch.rand(b, s, hkv, nb, device=DEV, generator=gen)
    keys = torch.arange(nb, device=DEV)
    allowed = keys[None, None, None, :] < cur[None, :, None, None]  # earlier blocks only
    r = torch.where(allowed, r, torch.full_like(r, -1.0))
    top = r.topk(k - 1, dim=-1)
    idx = torch.where(top.values >= 0, top.indices, torch.full_like(top.indices, -1))
    own = cur[None, :, None, None].expand(b, s, hkv, 1)
    idx = torch.cat([idx, own], dim=-1)
    idx = torch.where(idx < 0, torch.full_like(idx, nb + 1), idx).sort(dim=-1).values
    idx = torch.where(idx > nb, torch.full_like(idx, -1), idx)
    return idx.to(torch.int32)


def bench_nsa(b, hq, hkv, s, d, block, k):
    import torch
    from fla.ops.nsa.parallel import ParallelNSAFunction
    gen = torch.Generator(device=DEV).manual_seed(0)
    q = torch.randn(b, s, hq, d, device=DEV, dtype=torch.float16, requires_grad=True)
    kk = torch.randn(b, s, hkv, d, device=DEV, dtype=torch.float16, requires_grad=True)
    v = torch.randn(b, s, hkv, d, device=DEV, dtype=torch.float16, requires_grad=True)
    idx = random_block_indices(b, hkv, s, block, k, gen)
    scale = d ** -0.5
    return time_fwd_bwd(lambda: ParallelNSAFunction.apply(q, kk, v, idx, k, block, scale, None),
                        (q, kk, v))


def bench_flex(b, hq, hkv, s, d, density):
    """FlexAttention, block mask of 128x128 blocks: each query block keeps its diagonal block and
    random earlier ones so that the kept fraction of causal keys matches `density`."""
    import torch
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
    fa = torch.compile(flex_attention, dynamic=False)
    bs = 128
    nqb = (s + bs - 1) // bs
    gen = torch.Generator(device=DEV).manual_seed(0)
    g = hq // hkv
    # The mask is given block by block (BlockMask.from_kv_blocks): the diagonal block is partial
    # (causal inside), the kept earlier blocks are full. Evaluating a mask function instead needs
    # S x S memory in eager mode (out of memory at 16k) and failed compiled at 8k.
    part_num = torch.ones(1, hkv, nqb, dtype=torch.int32, device=DEV)
    part_idx = torch.zeros(1, hkv, nqb, nqb, dtype=torch.int32, device=DEV)
    full_num = torch.zeros(1, hkv, nqb, dtype=torch.int32, device=DEV)
    full_idx = torch.zeros(1, hkv, nqb, nqb, dtype=torch.int32, device=DEV)
    kept = []
    for qb in range(nqb):
        part_idx[:, :, qb, 0] = qb
        n = max(1, round(density * (qb + 1)))
        earlier = torch.randperm(qb, device=DEV, generator=gen)[: n - 1].sort().values
        full_num[:, :, qb] = len(earlier)
        full_idx[:, :, qb, : len(earlier)] = earlier.to(torch.int32)
        kept.append(len(earlier))

    def causal(bb, hh, qi, ki):
        return qi >= ki

    def heads(t):
        return t.repeat_interleave(g, dim=1)

    bm = BlockMask.from_kv_blocks(heads(part_num), heads(part_idx), heads(full_num),
                                  heads(full_idx), BLOCK_SIZE=bs, mask_mod=causal)
    q = torch.randn(b, hq, s, d, device=DEV, dtype=torch.float16, requires_grad=True)
    kk = torch.randn(b, hkv, s, d, device=DEV, dtype=torch.float16, requires_grad=True)
    v = torch.randn(b, hkv, s, d, device=DEV, dtype=torch.float16, requires_grad=True)
    tf, tb = time_fwd_bwd(lambda: fa(q, kk, v, block_mask=bm, enable_gqa=True), (q, kk, v))
    # Actual kept pairs: full earlier blocks plus the causal half of each diagonal block.
    pairs = 0
    for qb, n in enumerate(kept):
        rows = min(s, (qb + 1) * bs) - qb * bs
        pairs += n * bs * rows + rows * (rows + 1) // 2
    return tf, tb, pairs * b * hq


def fmt(x, w=8, p=2):
    return f"{x:{w}.{p}f}" if x is not None else " " * (w - 1) + "-"


def render(rows):
    """The table: peers, then each of our rows with the ratio against the peer of its shape."""
    peers = {(tuple(x["key"]), x["peer"]): x for x in rows if not x["impl"].startswith("ours")}
    hdr = (f"{'kind':<22} {'b':>3} {'hq':>3} {'seq':>6} {'d':>4} | {'implementation':<40} | "
           f"{'fwd ms':>8} {'eq TF/s':>8} {'TF/s':>8} {'vs peer':>8} | "
           f"{'bwd ms':>8} {'eq TF/s':>8} {'vs peer':>8}")
    print(hdr)
    print("-" * len(hdr))
    for x in rows:
        key = tuple(x["key"])
        p = peers.get((key, x["peer"]))
        ours = x["impl"].startswith("ours")
        if ours and p is None:
            continue  # the peer did not run at this shape (see the log)
        b, h, s, d = key
        rf = p["fwd_s"] / x["fwd_s"] if ours else None
        rb = p["bwd_s"] / x["bwd_s"] if ours and x["bwd_s"] and p["bwd_s"] else None
        bwd_tf = 2.5 * x["flops"] / x["bwd_s"] * 1e-12 if x["bwd_s"] else None
        impl = f"{x['impl']} (vs {x['peer']})" if ours and "sparse" in x["kind"] else x["impl"]
        print(f"{x['kind']:<22} {b:>3} {h:>3} {s:>6} {d:>4} | {impl:<40} | "
              f"{fmt(x['fwd_s'] * 1e3, 8, 3)} {fmt(x['flops'] / x['fwd_s'] * 1e-12)} "
              f"{fmt(x['actual'] / x['fwd_s'] * 1e-12)} {fmt(rf, 7) + 'x' if rf else ' ' * 8} | "
              f"{fmt(x['bwd_s'] * 1e3 if x['bwd_s'] else None, 8, 3)} {fmt(bwd_tf)} "
              f"{fmt(rb, 7) + 'x' if rb else ' ' * 8}")
    print("\nvs peer = peer time / our time (above 1: ours is faster). eq TF/s = causal dense "
          "FLOPs / time; TF/s = FLOPs of the pairs actually attended.")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ours-full", help="JSON records of `bench full --json-out`")
    ap.add_argument("--ours-sparse", help="JSON records of `bench sparse --json-out`")
    ap.add_argument("--render", help="print the table of an earlier run's --out file and stop")
    ap.add_argument("--flex", default="128",
                    help="head dims (comma-separated) to run FlexAttention at; 0 = none "
                         "(each shape compiles anew, ~0.5 min)")
    ap.add_argument("--out", help="write the combined rows as JSON here")
    a = ap.parse_args()
    if a.render:
        render(json.load(open(a.render)))
        return
    import torch
    ours_full = [r for rec in map(json.loads, open(a.ours_full)) for r in rec["results"]]
    ours_sparse = [r for rec in map(json.loads, open(a.ours_sparse)) for r in rec["results"]]
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    rows = []

    # Dense: every shape our full benchmark ran, against SDPA (flash).
    for r in ours_full:
        b, h, s, d = r["batch"], r["heads_q"], r["seq_q"], r["head_dim"]
        if r["heads_kv"] != h or not r["causal"]:
            continue
        key = (b, h, s, d)
        fl = 4 * d * causal_pairs(s) * b * h
        if not any(x.get("key") == key and x["peer"] == "sdpa-flash" for x in rows):
            tf, tb = bench_sdpa(b, h, s, d)
            rows.append(dict(key=key, kind="dense", peer="sdpa-flash", impl="torch sdpa (flash)",
                             fwd_s=tf, bwd_s=tb, flops=fl, actual=fl))
        rows.append(dict(key=key, kind="dense", peer="sdpa-flash",
                         impl=f"ours {r['storage']} {r['variant']}",
                         fwd_s=r["fwd_ms"] / 1e3,
                         bwd_s=(r["bwd_ms"] or 0) / 1e3 or None, flops=fl, actual=fl))

    # Sparse: every shape our sparse benchmark ran, against fla NSA and FlexAttention.
    for r in ours_sparse:
        b, hq, hkv, s, d = r["batch"], r["heads_q"], r["heads_kv"], r["seq_q"], r["head_dim"]
        blk, k = r["block"], r["k"]
        key = (b, hq, s, d)
        fl = 4 * d * causal_pairs(s) * b * hq
        act = 4 * d * sparse_pairs(s, blk, k) * b * hq
        try:
            tf, tb = bench_nsa(b, hq, hkv, s, d, blk, k)
            rows.append(dict(key=key, kind=f"sparse B{blk} k{k} G{hq // hkv}", peer="fla-nsa",
                             impl="fla NSA (triton)", fwd_s=tf, bwd_s=tb, flops=fl, actual=act))
        except Exception as e:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
            print(f"fla NSA failed at {key}: {e!r}", file=sys.stderr)
        if str(d) in a.flex.split(","):
            try:
                density = sparse_pairs(s, blk, k) / causal_pairs(s)
                tf, tb, pairs = bench_flex(b, hq, hkv, s, d, density)
                rows.append(dict(key=key, kind=f"sparse B{blk} k{k} G{hq // hkv}", peer="flex",
                                 impl="torch flex (128-blocks, same density)", fwd_s=tf, bwd_s=tb,
                                 flops=fl, actual=4 * d * pairs))
            except Exception as e:  # noqa: BLE001
                print(f"FlexAttention failed at {key}: {e!r}", file=sys.stderr)
        for peer in ("fla-nsa", "flex"):
            rows.append(dict(key=key, kind=f"sparse B{blk} k{k} G{hq // hkv}", peer=peer,
                             impl=(f"ours {r.get('dtype', 'F32').lower()} {r.get('forward', '')} sparse fwd"
                                   + (f" / {r['backward']} bwd" if r.get("backward") else "")).replace("  ", " "),
                             fwd_s=r["sparse_fwd_ms"] / 1e3,
                             bwd_s=(r["sparse_bwd_ms"] or 0) / 1e3 or None, flops=fl, actual=act))
            rows.append(dict(key=key, kind=f"sparse B{blk} k{k} G{hq // hkv}", peer=peer,
                             impl=f"ours {r.get('dtype', 'F32').lower()} {r.get('forward', '')} select + sparse fwd".replace("  ", " "),
                             fwd_s=(r["sparse_fwd_ms"] + r["select_ms"]) / 1e3, bwd_s=None,
                             flops=fl, actual=act))

    print()
    render(rows)
    if a.out:
        with open(a.out, "w") as f:
            json.dump([{**x, "key": list(x["key"])} for x in rows], f, indent=1)


if __name__ == "__main__":
    main()
