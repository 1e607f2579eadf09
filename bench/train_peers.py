"""Training throughput of the model of docs/RESULTS.md in PyTorch, next to ours (issue 20).

The same architecture as `sparse-attn train` (src/train/model.rs): byte vocabulary (256), tied
embedding, 6 layers of RMSNorm -> q, k, v and a sigmoid output gate -> RoPE -> causal GQA
attention (8 query / 2 kv heads, head_dim 48) -> gate * attention -> output projection, residual;
RMSNorm -> SwiGLU (d_ff 1024), residual; final RMSNorm; cross-entropy; AdamW (lr 1e-3, weight
decay 0.1) with gradient-norm clipping at 1.0. Attention is PyTorch's SDPA (flash / cuDNN
kernels where they apply). Three settings: eager fp32 (TF32 matmuls off), eager bf16 autocast,
torch.compile with bf16 autocast. Random tokens (speed does not depend on the text).

    python3 bench/train_peers.py --batches 4,16,64 --out torch.json
    python3 bench/train_peers.py --merge DIR   # DIR/torch.json + DIR/ours-b*.txt -> table

Differences that remain: clipping is by the global norm here and per parameter in ours (Burn's
GradientClippingConfig::Norm); RoPE rotates halves here and adjacent pairs in ours (the same
cost).
"""

import argparse
import glob
import json
import math
import os
import sys
import time


def build(args):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class RMSNorm(nn.Module):
        def __init__(self, d, eps=1e-5):
            super().__init__()
            self.w = nn.Parameter(torch.ones(d))
            self.eps = eps

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.w

    def rope_tables(seq, dh, theta, device):
        inv = 1.0 / theta ** (torch.arange(0, dh, 2, device=device).float() / dh)
        f = torch.outer(torch.arange(seq, device=device).float(), inv)
        return torch.cat([f, f], -1).cos(), torch.cat([f, f], -1).sin()

    def rope(x, cos, sin):
        h = x.shape[-1] // 2
        rot = torch.cat([-x[..., h:], x[..., :h]], -1)
        return x * cos + rot * sin

    class Layer(nn.Module):
        def __init__(self, d, hq, hkv, ff):
            super().__init__()
            dh = d // hq
            self.hq, self.hkv, self.dh = hq, hkv, dh
            self.n1, self.n2 = RMSNorm(d), RMSNorm(d)
            self.wq = nn.Linear(d, hq * dh, bias=False)
            self.wk = nn.Linear(d, hkv * dh, bias=False)
            self.wv = nn.Linear(d, hkv * dh, bias=False)
            self.wg = nn.Linear(d, hq * dh, bias=False)
            self.wo = nn.Linear(hq * dh, d, bias=False)
            self.w1 = nn.Linear(d, ff, bias=False)
            self.w3 = nn.Linear(d, ff, bias=False)
            self.w2 = nn.Linear(ff, d, bias=False)

        def forward(self, x, cos, sin):
            b, s, _ = x.shape
            h = self.n1(x)
            heads = lambda t, n: t.view(b, s, n, self.dh).transpose(1, 2)
            q = rope(heads(self.wq(h), self.hq), cos, sin)
            k = rope(heads(self.wk(h), self.hkv), cos, sin)
            v = heads(self.wv(h), self.hkv)
            g = torch.sigmoid(heads(self.wg(h), self.hq))
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            x = x + self.wo((g * a).transpose(1, 2).reshape(b, s, -1))
            h = self.n2(x)
            return x + self.w2(F.silu(self.w1(h)) * self.w3(h))

    class Lm(nn.Module):
        def __init__(self, a):
            super().__init__()
            self.embed = nn.Embedding(256, a.d_model)
            self.layers = nn.ModuleList(
                Layer(a.d_model, a.heads, a.kv_heads, a.d_ff) for _ in range(a.layers)
            )
            self.norm = RMSNorm(a.d_model)

        def forward(self, tokens, cos, sin):
            x = self.embed(tokens)
            for layer in self.layers:
                x = layer(x, cos, sin)
            return self.norm(x) @ self.embed.weight.t()

    return torch, F, Lm, rope_tables


def run(args):
    torch, F, Lm, rope_tables = build(args)
    dev = "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cos, sin = rope_tables(args.seq, args.d_model // args.heads, 10000.0, dev)
    rows = []
    for setting in args.settings.split(","):
        for batch in [int(b) for b in args.batches.split(",")]:
            torch.manual_seed(1)
            model = Lm(args).to(dev)
            params = sum(p.numel() for p in model.parameters())
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
            fwd = torch.compile(model) if setting == "compile-bf16" else model
            bf16 = setting in ("eager-bf16", "compile-bf16")

            def step():
                x = torch.randint(0, 256, (batch, args.seq + 1), device=dev)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                    logits = fwd(x[:, :-1], cos, sin)
                    loss = F.cross_entropy(logits.float().reshape(-1, 256), x[:, 1:].reshape(-1))
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                return loss

            try:
                t0 = time.time()
                for _ in range(args.warmup):
                    step()
                torch.cuda.synchronize()
                warm = time.time() - t0
                t0 = time.time()
                for _ in range(args.steps):
                    loss = step()
                torch.cuda.synchronize()
                dt = (time.time() - t0) / args.steps
                row = {
                    "setting": setting, "batch": batch, "seq": args.seq, "params": params,
                    "step_s": dt, "tokens_per_s": batch * args.seq / dt,
                    "warmup_s": warm, "loss": float(loss),
                }
            except torch.OutOfMemoryError as e:
                row = {"setting": setting, "batch": batch, "seq": args.seq, "error": str(e)[:200]}
            print(json.dumps(row), flush=True)
            rows.append(row)
            del model, opt, fwd
            torch.cuda.empty_cache()
    out = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "rows": rows,
    }
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


def merge(d):
    torch = json.load(open(os.path.join(d, "torch.json")))
    ours = {}
    device = None
    for f in sorted(glob.glob(os.path.join(d, "ours-b*.txt"))):
        lines = [l for l in open(f) if l.startswith("{")]
        if not lines:
            print(f"{f}: no JSON record (the run failed?)", file=sys.stderr)
            continue
        j = json.loads(lines[-1])
        device = j["device"]
        for r in j["rows"]:
            # Records from before --precision are f32.
            prec = r["config"].get("precision", "f32")
            ours[(r["config"]["batch"], prec, r["mode"])] = r
    tp = {(r["batch"], r["setting"]): r for r in torch["rows"]}
    batches = sorted({k[0] for k in ours} | {b for b, _ in tp})
    precs = [p for p in ["f32", "f16"] if any(k[1] == p for k in ours)] or ["f32"]
    modes = [m for m in ["full", "sparse", "ssa", "nosa"] if any(k[2] == m for k in ours)]
    settings = ["eager-fp32", "eager-bf16", "compile-bf16"]
    print(f"ours: {device}; PyTorch {torch['torch']} on {torch['device']}\n")
    head = ["batch", "ours in"] + [f"ours {m}" for m in modes] + [f"torch {s}" for s in settings]
    head += ["full / eager fp32", "full / eager bf16", "SSA step / full step"]
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    fmt = lambda r: "-" if r is None else (
        "OOM" if "error" in r else f"{r['tokens_per_s'] / 1e3:.1f}k")
    for b, p in [(b, p) for b in batches for p in precs]:
        cells = [str(b), p]
        cells += [fmt(ours.get((b, p, m))) for m in modes]
        cells += [fmt(tp.get((b, s))) for s in settings]
        full = ours.get((b, p, "full"))
        for s in ["eager-fp32", "eager-bf16"]:
            t = tp.get((b, s))
            ok = full and t and "error" not in t
            cells.append(f"{full['tokens_per_s'] / t['tokens_per_s']:.2f}x" if ok else "-")
        ssa = ours.get((b, p, "ssa"))
        cells.append(f"{ssa['step_s'] / full['step_s']:.2f}" if ssa and full else "-")
        print("| " + " | ".join(cells) + " |")
    print("\nour kernels' share of the step (ms/step of the step):")
    for (b, p, m), r in sorted(ours.items()):
        ks = ", ".join(f"{k['kernel']} {k['s'] * 1e3:.1f}" for k in r["kernels"])
        print(f"  batch {b} {p} {m}: step {r['step_s'] * 1e3:.1f} ms, ours {r['ours_s'] * 1e3:.1f} ms: {ks}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="4,16,64")
    p.add_argument("--settings", default="eager-fp32,eager-bf16,compile-bf16")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--d-model", dest="d_model", type=int, default=384)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", dest="kv_heads", type=int, default=2)
    p.add_argument("--d-ff", dest="d_ff", type=int, default=1024)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", default="torch.json")
    p.add_argument("--merge", metavar="DIR")
    a = p.parse_args()
    if a.merge:
        merge(a.merge)
    else:
        run(a)


if __name__ == "__main__":
    main()
