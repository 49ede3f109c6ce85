#!/usr/bin/env python3
"""Trains kframe's embedded model: a tiny Qwen2 that must retrieve from its context.

The corpus comes from `kframe corpus` (one generator, in Rust, for training and
evaluation). This script trains a byte-level BPE tokenizer on it, then a
Qwen2ForCausalLM (head_dim 128 like Qwen2.5-3B, grouped-query attention) until
greedy recall on held-out questions reaches the targets, and writes a normal
Hugging Face directory that kframe embeds.

    python3 -m venv .venv && .venv/bin/pip install torch==2.15.0 transformers==5.23.0 tokenizers safetensors numpy
    cargo build --release -p kframe
    .venv/bin/python host/model/train/train_tiny.py --kframe target/release/kframe --out host/model/embedded
    .venv/bin/python host/model/train/reference_fixture.py --model host/model/embedded

Everything is seeded; the defaults are the committed model's run (seed 2: 1000
steps, about 6 minutes of training after 4 of corpus and tokenizer on 2 CPU cores;
training stops as soon as held-out recall reaches --target4 and --target16). A run
stops after --minutes with a checkpoint, and the same command resumes it. kframe
never needs Python at run time: the result is committed.
"""
import argparse
import json
import math
import random
import re
import subprocess
import time
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import Qwen2Config, Qwen2ForCausalLM

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2.5's chat template, reduced to the roles this model knows.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def corpus(kframe, seed, docs, recall=None):
    cmd = [kframe, "corpus", "--seed", str(seed), "--docs", str(docs)]
    if recall is not None:
        cmd += ["--recall", str(recall)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return [json.loads(line) for line in out.splitlines()]


def train_tokenizer(texts, vocab_size):
    tok = Tokenizer(models.BPE())
    # A run of digits with its leading space is one piece, so that BPE learns every
    # 4-digit secret as one token (the corpus holds each of the 10,000 about a
    # hundred times): answering is then one retrieval, the name's, and not four.
    # (A model trained on one token per digit, as Qwen2.5's tokenizer splits them,
    # found the record by its name but lost later digits among records that share
    # the earlier ones.) Then GPT-2 style byte-level pieces.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r" ?\p{N}+"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def encode_docs(tok, docs, other_weight):
    """Token ids and per-token loss weights. Answers weigh 1; everything else
    (filler, records whose digits are random anyway) weighs `other_weight`, so the
    gradient is mostly about retrieval."""
    texts = ["".join(s["text"] for s in d["segments"]) for d in docs]
    out = []
    for doc, enc in zip(docs, tok.encode_batch(texts)):
        spans, pos = [], 0
        for s in doc["segments"]:
            if s["target"]:
                spans.append((pos, pos + len(s["text"])))
            pos += len(s["text"])
        # In a pairs document nothing but the answers is predictable (random names
        # and digits): its other tokens only add noise to the gradient.
        rest = 0.0 if doc.get("pairs") else other_weight
        weights = [1.0 if any(a < e and b > s for s, e in spans) else rest for a, b in enc.offsets]
        out.append((enc.ids, weights))
    return out


def pair_docs(rng, names, n, most=8):
    """Associative-recall warm-up in its smallest form: a few pairs of a name and
    a secret (one token), then the names again in a shuffled order, each followed
    by its secret (the targets). The values are secrets, not single digits, so that
    what the model learns to copy is any of the 10,000 secret tokens (warmed up on
    ten digit values, the copy did not carry over to secrets). No answer sits at a fixed distance from its pair, so
    copying by position cannot solve it; only matching the name can. (A warm-up
    of repeated runs, tried first, taught positional copying: the model then
    copied a secret's later digits well but never learned to find the record by
    its name.)"""
    docs = []
    for _ in range(n):
        k = rng.randint(2, most)
        chosen = rng.sample(names, k)
        value = {name: f"{rng.randrange(10000):04d}" for name in chosen}
        segments = [{"text": "pairs" + "".join(f" {name} {value[name]}" for name in chosen) + " . again", "target": False}]
        rng.shuffle(chosen)
        for name in chosen:
            segments.append({"text": f" {name}", "target": False})
            segments.append({"text": f" {value[name]}", "target": True})
        docs.append({"segments": segments, "pairs": True})
    return docs


def drill_docs(rng, names, n, most):
    """Associative-recall drills: 2..`most` records, then every one of them asked
    back in a shuffled order, each answer a target. A record document asks one
    question; a drill asks k, and no answer sits at a fixed distance from its
    record, so only matching the name finds it (copying by position, which the
    warm-up runs also reward, cannot)."""
    docs = []
    for _ in range(n):
        k = rng.randint(2, most)
        chosen = rng.sample(names, k)
        secrets = {name: f"{rng.randrange(10000):04d}" for name in chosen}
        segments = [{"text": "".join(f"user secret of {name} {secrets[name]} . " for name in chosen).rstrip(), "target": False}]
        rng.shuffle(chosen)
        for name in chosen:
            segments.append({"text": f" query secret of {name}", "target": False})
            segments.append({"text": f" {secrets[name]}", "target": True})
            segments.append({"text": " .", "target": False})
        docs.append({"segments": segments, "drill": True})
    return docs


def init_previous_token_head(model, scale):
    """Starts layer 0's first query head as a previous-token head; training then
    adapts it like every other weight.

    Retrieval by name is an induction circuit: a head in layer 0 copies each
    token's predecessor into its position (so a secret's first digit "knows" the
    name before it), and a head in a later layer matches the question's name
    against that and copies the digit. Trained from a random start on 2 CPU cores,
    the model sat for tens of thousands of steps on the plateau before this
    circuit forms (it learned to guess a digit that occurs in the context, but not
    which). Olsson et al. (2022) describe the same phase change. Starting the
    layer-0 attention pattern in place removes the plateau: name-digit pairs are
    solved within a few hundred steps.

    Only the query and key biases are set, so the pattern is positional: Qwen2 adds
    the biases before RoPE, and with the query bias on the 8 fastest rotary pairs
    (angle theta_j per position) and the key bias on the same pairs turned ahead by
    theta_j, the score between positions i and i' is
    scale^2 * sum_j cos(theta_j * (i - i' - 1)), largest at i' = i - 1. Scale 7.7
    puts ~9 logits between the previous token and any other, so the head starts
    with ~99.9% of its attention on the previous token. (HF's rotate_half pairs
    element j with j + head_dim / 2.)"""
    attn = model.model.layers[0].self_attn
    half = model.config.head_dim // 2
    base = model.config.rope_parameters["rope_theta"]
    with torch.no_grad():
        for j in range(8):
            theta = base ** (-2 * j / model.config.head_dim)
            attn.q_proj.bias[j] = scale
            attn.k_proj.bias[j] = scale * math.cos(theta)
            attn.k_proj.bias[j + half] = scale * math.sin(theta)


def records_in(doc):
    """Number of records a document holds (0 for a chat)."""
    first = doc["segments"][0]["text"]
    return 0 if first.startswith("<|im_start|>") else first.count("user secret of ")


def recall_batch(tok, items):
    """Prompt+answer ids and the positions whose argmax must equal the answer."""
    rows = []
    for it in items:
        p = tok.encode(it["context"] + it["question"]).ids
        a = tok.encode(it["answer"]).ids
        rows.append((p + a, len(p), len(a)))
    return rows


@torch.no_grad()
def recall(model, tok, items, batch=64, per_token=None):
    """Exact greedy recall, teacher-forced: every answer token is the argmax.
    `per_token`, a list, receives the share of answer tokens that are right (shows
    progress before whole answers do)."""
    model.eval()
    hits, right, total = 0, 0, 0
    rows = recall_batch(tok, items)
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]
        width = max(len(r[0]) for r in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for j, (seq, _, _) in enumerate(chunk):
            ids[j, : len(seq)] = torch.tensor(seq)
            mask[j, : len(seq)] = 1
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        for j, (seq, p, a) in enumerate(chunk):
            pred = model.lm_head(hidden[j, p - 1 : p + a - 1]).argmax(-1).tolist()
            hits += pred == seq[p : p + a]
            right += sum(x == y for x, y in zip(pred, seq[p : p + a]))
            total += a
    model.train()
    if per_token is not None:
        per_token.append(right / max(total, 1))
    return hits / len(rows)


def batches(encoded, batch_tokens, rng):
    """Length-bucketed batches of whole documents (no packing: a name reused in a
    neighbouring document would teach the wrong retrieval)."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]) + rng.random())
    out, cur, width = [], [], 0
    for i in order:
        n = len(encoded[i][0])
        if cur and max(width, n) * (len(cur) + 1) > batch_tokens:
            out.append(cur)
            cur, width = [], 0
        cur.append(i)
        width = max(width, n)
    if cur:
        out.append(cur)
    rng.shuffle(out)
    return out


def collate(encoded, idx):
    width = max(len(encoded[i][0]) for i in idx)
    ids = torch.zeros(len(idx), width, dtype=torch.long)
    w = torch.zeros(len(idx), width)
    mask = torch.zeros(len(idx), width, dtype=torch.long)
    for j, i in enumerate(idx):
        seq, wt = encoded[i]
        ids[j, : len(seq)] = torch.tensor(seq)
        w[j, : len(seq)] = torch.tensor(wt)
        mask[j, : len(seq)] = 1
    return ids, w, mask


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kframe", default="target/release/kframe")
    ap.add_argument("--out", default="host/model/embedded")
    ap.add_argument("--seed", type=int, default=2)
    ap.add_argument("--docs", type=int, default=150000)
    ap.add_argument("--vocab", type=int, default=13000)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--pair-docs", type=int, default=40000, help="associative-recall warm-up documents (see pair_docs)")
    ap.add_argument("--drill-docs", type=int, default=40000, help="associative-recall drills (see drill_docs)")
    ap.add_argument(
        "--other-weight", type=float, default=0.0, help="loss weight of tokens that are not answers (0: answers only)"
    )
    ap.add_argument("--batch-tokens", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=12000, help="length of the learning-rate schedule")
    ap.add_argument(
        "--prev-token-init", type=float, default=7.7, help="query/key bias scale of the previous-token head at init (0: none)"
    )
    ap.add_argument("--minutes", type=float, default=60.0, help="stop this run after this long, saving a checkpoint to resume from")
    ap.add_argument("--checkpoint", default="target/train-tiny/checkpoint.pt")
    ap.add_argument("--warmup-records", type=int, default=4, help="most records in a warm-up document")
    ap.add_argument("--target4", type=float, default=0.99)
    ap.add_argument("--target16", type=float, default=0.95)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    out = Path(args.out)

    docs = corpus(args.kframe, args.seed, args.docs)
    texts = ["".join(s["text"] for s in d["segments"]) for d in docs]
    tok = train_tokenizer(texts, args.vocab)
    names = sorted({n for t in texts for n in re.findall(r"user secret of (\w+)", t)})
    docs += pair_docs(rng, names, args.pair_docs)
    drills = drill_docs(rng, names, args.drill_docs, 16)
    docs += drills
    encoded = encode_docs(tok, docs, args.other_weight)
    held4 = corpus(args.kframe, args.seed + 1000, 300, recall=4)
    held16 = corpus(args.kframe, args.seed + 1001, 300, recall=16)
    print(f"vocab {tok.get_vocab_size()}, {len(docs)} docs, mean {sum(len(e[0]) for e in encoded) / len(encoded):.0f} tokens", flush=True)

    heads = args.hidden // 128
    cfg = Qwen2Config(
        vocab_size=tok.get_vocab_size(),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        head_dim=128,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        use_sliding_window=False,
        bos_token_id=tok.token_to_id("<|endoftext|>"),
        eos_token_id=[tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")],
    )
    model = Qwen2ForCausalLM(cfg)
    if args.prev_token_init:
        init_previous_token_head(model, args.prev_token_init)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params / 1e6:.2f}M", flush=True)
    assert n_params <= 8_000_000
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    # Curriculum, advanced by progress: first only name-digit pairs, until the
    # model finds a value by its name (answer loss far below the 2.3 of guessing a
    # digit); then documents and drills with few records (little distraction), some
    # pairs and a few chats, until most held-out answer digits are right; then
    # everything.
    pairs = [e for d, e in zip(docs, encoded) if d.get("pairs")]
    short = [
        e
        for d, e in zip(docs, encoded)
        if (d.get("pairs") and rng.random() < 0.3)
        or (d.get("drill") and records_in(d) <= 2 * args.warmup_records)
        or 0 < records_in(d) <= args.warmup_records
        or (records_in(d) == 0 and not d.get("pairs") and rng.random() < 0.2)
    ]
    phases = [("pairs", pairs), ("few records", short), ("all", encoded)]

    # A run on 2 CPU cores takes hours, so it checkpoints every few minutes and a
    # rerun with the same arguments resumes (the batch order after a resume is a
    # fresh shuffle, so a resumed run is seeded but not bit-identical to one
    # uninterrupted run).
    ckpt = Path(args.checkpoint)
    step, phase, target_loss, best = 0, 0, None, (-1.0, None)
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, phase, target_loss, best = state["step"], state["phase"], state["target_loss"], state["best"]
        rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        print(f"resumed from {ckpt} at step {step}, phase {phases[phase][0]}", flush=True)

    def save_checkpoint():
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "model": model.state_dict(),
            "opt": opt.state_dict(),
            "step": step,
            "phase": phase,
            "target_loss": target_loss,
            "best": best,
            "rng": rng.getstate(),
            "torch_rng": torch.get_rng_state(),
        }
        torch.save(state, str(ckpt) + ".tmp")
        Path(str(ckpt) + ".tmp").replace(ckpt)

    def stream(pool):
        while True:
            yield from batches(pool, args.batch_tokens, rng)

    streams = [stream(pool) for _, pool in phases]
    start = last_save = time.time()
    finished = False
    print(f"phase {phases[phase][0]}", flush=True)
    while True:
        elapsed = time.time() - start
        if elapsed > args.minutes * 60:
            break
        frac = min(1.0, step / args.steps)
        lr = args.lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        ids, w, mask = collate(phases[phase][1], next(streams[phase]))
        # The vocabulary is large (every secret is a token), so logits are computed
        # only where the loss weighs something.
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
        target, wt = ids[:, 1:].reshape(-1), (w[:, 1:] * mask[:, 1:]).reshape(-1)
        keep = wt > 0
        logits = model.lm_head(hidden.reshape(-1, hidden.size(-1))[keep])
        loss = torch.nn.functional.cross_entropy(logits, target[keep], reduction="none")
        wt = wt[keep]
        answers = (wt == 1.0).float()
        step_target_loss = ((loss * answers).sum() / answers.sum().clamp(min=1)).item()
        target_loss = step_target_loss if target_loss is None else 0.98 * target_loss + 0.02 * step_target_loss
        loss = (loss * wt).sum() / wt.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if phase == 0 and (target_loss < 0.3 or step > 0.3 * args.steps):
            phase = 1
            print(f"step {step}: phase {phases[phase][0]} (answer loss {target_loss:.3f})", flush=True)
        if step % 200 == 0 or step >= args.steps:
            tokens4 = []
            r4, r16 = recall(model, tok, held4[:200], per_token=tokens4), recall(model, tok, held16[:200])
            print(
                f"step {step} {elapsed / 60:.1f} min phase {phase} loss {loss.item():.3f} answer loss {target_loss:.3f} "
                f"lr {lr:.2e} recall4 {r4:.3f} (answer tokens {tokens4[0]:.3f}) recall16 {r16:.3f}",
                flush=True,
            )
            if r4 + r16 > best[0]:
                best = (r4 + r16, {k: v.detach().clone() for k, v in model.state_dict().items()})
            if phase == 1 and (tokens4[0] >= 0.8 or step > 0.6 * args.steps):
                phase = 2
                print(f"step {step}: phase {phases[phase][0]}", flush=True)
            if (r4 >= args.target4 and r16 >= args.target16) or step >= args.steps:
                finished = True
                break
        if time.time() - last_save > 300:
            save_checkpoint()
            last_save = time.time()
    save_checkpoint()
    if not finished:
        print(f"stopped at step {step} after {args.minutes} min; rerun the same command to resume", flush=True)
        return

    model.load_state_dict(best[1])
    # Stored in f16 to keep the repository small; recall is measured after the cast.
    model = model.half().float()
    r4, r16 = recall(model, tok, held4), recall(model, tok, held16)
    print(f"final (f16 weights) recall4 {r4:.3f} recall16 {r16:.3f} on 300 held-out questions each", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    model.half().save_pretrained(out, safe_serialization=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {"chat_template": CHAT_TEMPLATE, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None},
            indent=2,
        )
    )
    (out / "training.json").write_text(
        json.dumps(
            {
                "seed": args.seed,
                "docs": args.docs,
                "steps": step,
                "parameters": n_params,
                "heldout_recall_4_records": r4,
                "heldout_recall_16_records": r16,
                "args": vars(args),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
