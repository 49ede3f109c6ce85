#!/usr/bin/env python3
"""Writes an independent reference for kframe's forward pass: Hugging Face
transformers' Qwen2ForCausalLM (PyTorch, f32) run on the embedded model.

For each fixed prompt it records the token ids (from the `tokenizers` library), the
logits of the last position after the prompt and of the first decode step, and 8
greedy steps.
kframe's test (host/model/tests/embedded.rs) checks its own tokens and logits against this
file; CI uses the committed fixture and never installs torch.

    .venv/bin/python host/model/train/reference_fixture.py --model host/model/embedded \\
        --out host/model/tests/fixtures/hf_reference.json
"""
import argparse
import json

import torch
import transformers
from tokenizers import Tokenizer
from transformers import Qwen2ForCausalLM

PROMPTS = [
    "user secret of alice 4821 . the river runs north past the old mill . user secret of bob 0934 . query secret of alice",
    "user secret of nora 1177 . user secret of ivan 5302 . a cold wind came down from the hills . user secret of zoe 8890 . user secret of omar 2468 . query secret of zoe",
    "<|im_start|>user\nremember code 4821<|im_end|>\n<|im_start|>assistant\nok , i will remember it .<|im_end|>\n<|im_start|>user\nwhat is my code ?<|im_end|>\n<|im_start|>assistant\n",
    "the market opens early on most days .",
]
STEPS = 8
# Full logits (rounded to 1e-5, far inside the 1e-4 the test allows) for the
# prompt's last position and the first decode step; the greedy tokens for all
# STEPS. With every secret a token the vocabulary is 11,630 wide, and this keeps
# the fixture under a megabyte.
LOGIT_STEPS = 2


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="host/model/embedded")
    ap.add_argument("--out", default="host/model/tests/fixtures/hf_reference.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    tok = Tokenizer.from_file(f"{args.model}/tokenizer.json")
    model = Qwen2ForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="eager").eval()
    cases = []
    with torch.no_grad():
        for text in PROMPTS:
            ids = tok.encode(text).ids
            seq, greedy, logits = list(ids), [], []
            for _ in range(STEPS + 1):
                last = model(input_ids=torch.tensor([seq])).logits[0, -1].float()
                if len(logits) < LOGIT_STEPS:
                    logits.append([round(float(x), 5) for x in last])
                nxt = int(last.argmax())
                greedy.append(nxt)
                seq.append(nxt)
            cases.append({"text": text, "ids": ids, "greedy": greedy[:STEPS], "logits": logits})
    out = {
        "model": args.model,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dtype": "float32 (weights stored in f16)",
        "steps": STEPS,
        "logit_steps": LOGIT_STEPS,
        "cases": cases,
    }
    with open(args.out, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
