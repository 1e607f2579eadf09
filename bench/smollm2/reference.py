"""Reference outputs of SmolLM2-135M-Instruct (Q4_1 GGUF) from Hugging Face transformers, for
tests/tokenizer.rs and tests/llama.rs to hold our tokenizer and model to (issue 19).

    python3 bench/smollm2/reference.py DIR FILE.gguf OUT.json

transformers dequantises the GGUF file to float32 and runs its own Llama; the tokenizer is the
one transformers builds from the same file's metadata. Recorded: token ids of texts (Unicode,
code, whitespace, the chat prompt); for each prompt the last position's logits at the 64
largest and at 64 fixed token ids, and the argmax at every position; greedy continuations of
64 tokens (argmax each step, not stopping at end-of-sequence), computed on the CPU in float64
from the float32 weights so that near-ties are decided by the exact values.
"""
import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

TEXTS = [
    "Hello, world! The capital of France is Paris.",
    "Ünïcödé: naïve café, Ελληνικά, русский, 日本語のテキスト, emoji 🙂👍🏽 and \u200d joiners",
    "fn main() {\n\tlet x: Vec<u32> = (0..10).collect();\n    println!(\"{x:?}\");\n}\n",
    "   leading, trailing and   inner   spaces   ",
    "\n\n\r\n\t \t\n",
    "numbers 1234567890 and 3.14159e-10, -42, 0x1F",
    "<|im_start|>user\nhi<|im_end|>\n",
    "a",
]
CHATS = ["What is the capital of France?", "Write a Python function that reverses a string."]
RAW = ["The quick brown fox", "def fibonacci(n):\n    "]
FIXED_IDS = list(range(0, 49152, 768))


def main():
    d, name, out = sys.argv[1], sys.argv[2], sys.argv[3]
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    model.eval()
    print(f"loaded in {time.time() - t0:.1f} s: {type(model).__name__}", flush=True)
    rec = {
        "source": f"transformers {__import__('transformers').__version__}, torch {torch.__version__}",
        "file": name,
        "tokenizer": [{"text": t, "ids": tok.encode(t, add_special_tokens=False)} for t in TEXTS],
        "prompts": [],
    }
    prompts = []
    for c in CHATS:
        text = tok.apply_chat_template(
            [{"role": "user", "content": c}], tokenize=False, add_generation_prompt=True
        )
        prompts.append(("chat", c, text))
    prompts += [("raw", r, r) for r in RAW]
    m64 = model.to(torch.float64)
    for kind, given, text in prompts:
        ids = tok.encode(text, add_special_tokens=False)
        x = torch.tensor([ids])
        with torch.no_grad():
            logits = m64(x).logits[0]
        last = logits[-1]
        top = torch.topk(last, 64)
        greedy = []
        cur = list(ids)
        with torch.no_grad():
            past = None
            inp = x
            for _ in range(64):
                o = m64(inp, past_key_values=past, use_cache=True)
                past = o.past_key_values
                nxt = int(o.logits[0, -1].argmax())
                greedy.append(nxt)
                inp = torch.tensor([[nxt]])
        rec["prompts"].append({
            "kind": kind,
            "given": given,
            "text": text,
            "ids": ids,
            "argmax": [int(a) for a in logits.argmax(-1)],
            "top_ids": [int(i) for i in top.indices],
            "top_logits": [float(v) for v in top.values],
            "fixed_logits": [float(last[i]) for i in FIXED_IDS],
            "fixed_ids": FIXED_IDS,
            "logit_std": float(last.std()),
            "greedy": greedy,
            "greedy_text": tok.decode(greedy),
        })
        print(f"{kind} {given!r}: {len(ids)} tokens -> {tok.decode(greedy)!r}", flush=True)
    with open(out, "w") as f:
        json.dump(rec, f, ensure_ascii=False, indent=1)
    print(f"done in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
