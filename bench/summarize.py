#!/usr/bin/env python3
"""Turn `sparse-attn bench full --json-out` records (JSON lines) into the markdown tables of
docs/BENCHMARKS.md.  Usage: bench/summarize.py bench/results/h100-full-2026-11-23.jsonl"""
import json
import sys

for path in sys.argv[1:]:
    for line in open(path):
        rec = json.loads(line)
        rows = rec["results"]
        d = rows[0]["head_dim"]
        print(f"\n`{rec['command']}`  \n{rec['device']}, {rec['date_utc']}\n")
        variants = list(dict.fromkeys(r["variant"] for r in rows))
        head = "| seq | batch x heads | causal | " + " | ".join(
            f"{v} fwd | {v} bwd" for v in variants) + " |"
        print(head)
        print("|" + " --- |" * (3 + 2 * len(variants)))
        keys = list(dict.fromkeys((r["seq_q"], r["causal"]) for r in rows))
        for seq, causal in keys:
            sel = {r["variant"]: r for r in rows if r["seq_q"] == seq and r["causal"] == causal}
            any_r = next(iter(sel.values()))
            cells = []
            for v in variants:
                r = sel.get(v)
                if r is None:
                    cells += ["-", "-"]
                else:
                    cells += [f"{r['fwd_tflops']:.1f}", f"{r['bwd_tflops']:.1f}" if r["bwd_tflops"] else "-"]
            print(f"| {seq} | {any_r['batch']} x {any_r['heads_q']} | {'yes' if causal else 'no'} | "
                  + " | ".join(cells) + " |")
