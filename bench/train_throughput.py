"""Training throughput on a refresh's mix of examples: trained tokens per second, MoRAL with the
project's trainer vs peft LoRA with a standard padded batch, on the bundled SmolLM2-135M.

The examples have the shapes one demo refresh trains (``tasks/train.build_examples``): short
closed-book QA pairs, a few open-book ones (two passages), document chunks as text. Arms, each in
its own subprocess, interleaved and repeated:

* ``moral`` — MoRAL E=8 top-2 r=8 through ``moe.train.train``: length-bucketed batches, the LM head
  only where a target is predicted;
* ``lora_padded`` — peft LoRA r=8 on the same linears, the usual loop: shuffled batches padded to
  their longest example, logits everywhere, the model's own loss;
* ``lora_trainer`` — the same LoRA through ``moe.train.train`` (what the trainer's batching alone buys).

"Trained tokens" are the non-padding tokens of the examples (the same count for every arm), so the
ratio is work done per second. Prints ONE JSON object.

    .venv/bin/python bench/train_throughput.py            # ~6 minutes on 2 CPU cores
    .venv/bin/python bench/train_throughput.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARMS = ("lora_padded", "lora_trainer", "moral")


def demo_examples(n_closed: int, n_open: int, n_text: int, seed: int = 0):
    """Examples shaped like a demo refresh's, built from the demo documents' sentences."""
    from moe.train import Example
    from tasks.chunking import split_sentences

    docs = [
        ROOT / "examples" / "docs" / n
        for n in ("harrowgate-remote-work-policy-2026.md", "lumenvale-release-notes.txt")
    ]
    sentences = [s for d in docs for s in split_sentences(d.read_text()) if len(s.split()) >= 8]
    rng = random.Random(seed)
    words = " ".join(sentences).split()
    blocks = [" ".join(words[i : i + 80]) for i in range(0, len(words) - 80, 40)]
    out = []
    for i in range(n_closed):
        s = sentences[i % len(sentences)].split()
        out.append(
            Example(
                question=" ".join(["What", "is", *s[: min(8, len(s) - 3)]]) + "?", answer=" ".join(s[-3:])
            )
        )
    for _ in range(n_open):
        s = rng.choice(sentences).split()
        ctx = "\n\n".join(rng.sample(blocks, 2))
        out.append(
            Example(
                question=" ".join(["What", "is", *s[:8]]) + "?",
                answer=" ".join(s[-3:]) + "\n" + " ".join(s),
                context=ctx,
            )
        )
    out += [Example(text=b) for b in rng.sample(blocks, min(n_text, len(blocks)))]
    rng.shuffle(out)
    return out


def padded_loop(model, tokenizer, examples, epochs: int, batch_size: int, lr: float) -> dict:
    """The common fine-tuning loop: random batches padded to their longest row, full logits."""
    import torch

    from moe.train import format_example

    enc = [format_example(tokenizer, e, 768) for e in examples]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    gen = torch.Generator().manual_seed(0)
    tokens, start = 0, time.perf_counter()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(enc), generator=gen).tolist()
        for b in range(0, len(order), batch_size):
            rows = [enc[i] for i in order[b : b + batch_size]]
            width = max(len(r["input_ids"]) for r in rows)
            ids = torch.full((len(rows), width), pad)
            labels = torch.full((len(rows), width), -100)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for j, r in enumerate(rows):
                n = len(r["input_ids"])
                ids[j, :n], labels[j, :n], mask[j, :n] = (
                    torch.tensor(r["input_ids"]),
                    torch.tensor(r["labels"]),
                    1,
                )
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            tokens += sum(len(r["input_ids"]) for r in rows)
    return {"tokens": tokens, "seconds": time.perf_counter() - start}


def run_arm(arm: str, quick: bool) -> dict:
    import torch

    from moe.base_model import load_base_model, resolve_base_model
    from moe.lora import make_lora_model
    from moe.train import TrainConfig, train
    from storage.settings import get_settings

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    settings = get_settings()
    base, tokenizer = load_base_model(resolve_base_model(None, settings.model_cache), device="cpu")
    examples = demo_examples(*((16, 3, 3) if quick else (80, 12, 14)))
    epochs = 1
    if arm == "moral":
        from moe import MoRALConfig, MoRALModel

        model = MoRALModel(base, MoRALConfig(num_experts=8, top_k=2, rank=8, alpha=16))
    else:
        model = make_lora_model(base, rank=8, alpha=16)
    if arm == "lora_padded":
        out = padded_loop(model, tokenizer, examples, epochs, 8, 1e-3)
    else:
        cfg = TrainConfig(epochs=epochs, learning_rate=1e-3, batch_size=8, max_length=768, device="cpu")
        r = train(model, tokenizer, examples, cfg)
        out = {"tokens": r.tokens, "seconds": r.seconds, "padded_tokens": r.padded_tokens}
    out["tokens_per_second"] = out["tokens"] / out["seconds"]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--arm", help=argparse.SUPPRESS)  # one arm, in a subprocess
    args = parser.parse_args(argv)
    if args.arm:
        print(json.dumps(run_arm(args.arm, args.quick)))
        return 0
    runs: dict[str, list[dict]] = {a: [] for a in ARMS}
    for _ in range(1 if args.quick else args.repeats):
        for arm in ARMS:
            cmd = [sys.executable, __file__, "--arm", arm] + (["--quick"] if args.quick else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs[arm].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    med = {a: statistics.median(r["tokens_per_second"] for r in runs[a]) for a in ARMS}
    print(json.dumps({
        "tokens_per_second": {a: round(v, 1) for a, v in med.items()},
        "moral_over_lora_padded": round(med["moral"] / med["lora_padded"], 3),
        "lora_trainer_over_lora_padded": round(med["lora_trainer"] / med["lora_padded"], 3),
        "runs": runs,
    }, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
