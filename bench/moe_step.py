"""Training-step time, peak memory and generation latency: MoRAL vs peft LoRA on SmolLM2-135M.

Each arm runs in its own subprocess (so peak memory is its own), arms are interleaved and repeated,
and every reported ratio is a ratio of medians over processes. Prints ONE JSON object.

    .venv/bin/python bench/moe_step.py            # full run (several minutes on 2 CPU cores)
    .venv/bin/python bench/moe_step.py --quick    # smoke test

Runs unchanged on CUDA when present (peak memory = torch.cuda.max_memory_allocated there).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

TARGETS = ["gate_proj", "up_proj", "down_proj"]
ARMS = ("lora", "moral", "moral_linear", "moral_dense")
GENERATE_ARMS = ("lora", "moral")


def _model_cache() -> Path:
    try:  # the project's one settings object, when available
        from storage.settings import get_settings

        return Path(get_settings().model_cache)
    except Exception:  # noqa: BLE001 - the bench must run without the storage layer
        return Path("~/.cache/moral-refresh/models").expanduser()


def _build(arm: str, base):
    """Wrap ``base`` for an arm; returns (model, aux_loss callable or None)."""
    if arm == "lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS)
        return get_peft_model(base, cfg), None
    from moe import MoRALConfig, MoRALModel

    kwargs = {
        "moral": {},
        "moral_linear": {"router_scope": "linear"},
        "moral_dense": {"top_k": 8, "balance_loss": "localized"},  # LoRAMoE-style dense arm
    }[arm]
    model = MoRALModel(
        base, MoRALConfig(**{"num_experts": 8, "top_k": 2, "rank": 8, "alpha": 16, "dropout": 0.05, **kwargs})
    )
    return model, model.aux_loss


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def worker(arm: str, args: argparse.Namespace) -> dict:
    """One arm in this process: timed AdamW steps, peak memory, then greedy KV-cache generation."""
    import torch

    from moe.base_model import load_base_model, pick_device

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.random_init:  # same architecture, random weights: timings do not depend on the values
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(args.model_dir)
        base = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        base = base.to(pick_device(args.device)).eval()
        pad_id = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
        pad_id = pad_id[0] if isinstance(pad_id, list) else pad_id
    else:
        base, tokenizer = load_base_model(args.model_dir, dtype=torch.float32, device=args.device)
        pad_id = tokenizer.pad_token_id
    device = next(base.parameters()).device
    model, aux = _build(arm, base)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq), generator=gen).to(device)
    mask = torch.ones_like(ids)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.warmup + args.steps):
        _sync(device)
        start = time.perf_counter()
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
        loss = out.loss + aux() if aux is not None else out.loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    result = {
        "arm": arm,
        "step_s": statistics.median(times[args.warmup :]),
        "peak_mem_mb": peak / 2**20,
        "trainable_params": sum(p.numel() for p in params),
    }
    if arm in GENERATE_ARMS and args.new_tokens > 0:
        model.eval()
        prompt = ids[:1, :16]  # [1, 16]
        kw = {
            "attention_mask": torch.ones_like(prompt),
            "max_new_tokens": args.new_tokens,
            "min_new_tokens": args.new_tokens,  # never stop early at EOS: every arm decodes the same count
            "do_sample": False,
            "use_cache": True,
            "pad_token_id": pad_id,
        }
        latencies = []
        with torch.no_grad():
            for _ in range(args.gen_repeats + 1):  # the first call is a warm-up
                _sync(device)
                start = time.perf_counter()
                tokens = model.generate(input_ids=prompt, **kw)
                _sync(device)
                latencies.append(time.perf_counter() - start)
        assert tokens.shape[1] == prompt.shape[1] + args.new_tokens
        result["generate_s"] = statistics.median(latencies[1:])
    result["torch_threads"] = torch.get_num_threads()
    result["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return result


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="processes per arm (interleaved)")
    p.add_argument("--steps", type=int, default=5, help="timed training steps per process")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps per process")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64, help="greedy tokens generated (batch 1)")
    p.add_argument("--gen-repeats", type=int, default=3, help="timed generate calls per process")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {ARMS}")
    p.add_argument("--device", default=None, help="cpu | cuda | auto (default: auto)")
    p.add_argument("--model-dir", default=None, help="base model directory (default: bundled SmolLM2)")
    p.add_argument(
        "--mmap-threshold",
        type=int,
        default=0,
        help="glibc MALLOC_MMAP_THRESHOLD_ for the arm processes, bytes (0: allocator default); "
        "e.g. 1048576 makes peak RSS reproducible at some cost in step time",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads per arm (0: torch's default)")
    p.add_argument(
        "--random-init",
        action="store_true",
        help="build the architecture from --model-dir's config.json with random weights (no weights needed)",
    )
    p.add_argument("--quick", action="store_true", help="smoke test: 1 process per arm, tiny run")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.steps, args.warmup, args.new_tokens, args.gen_repeats = 1, 2, 1, 8, 1
    return args


def _ratio(results: dict, arm: str, key: str) -> float | None:
    if not results.get(arm, {}).get(key) or not results.get("lora", {}).get(key):
        return None
    return round(statistics.median(results[arm][key]) / statistics.median(results["lora"][key]), 4)


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    if args.model_dir is None:
        from moe.base_model import resolve_base_model

        args.model_dir = str(resolve_base_model(None, _model_cache()))  # converts once, then cached
    arms = [a for a in args.arms.split(",") if a]
    unknown = set(arms) - set(ARMS)
    if unknown or "lora" not in arms:
        raise SystemExit(f"--arms must include 'lora' and only {ARMS}; got {arms}")
    passthrough = [
        f"--{k.replace('_', '-')}={v}"
        for k, v in vars(args).items()
        if k in ("steps", "warmup", "batch", "seq", "new_tokens", "gen_repeats", "model_dir", "threads")
    ]
    if args.device:
        passthrough.append(f"--device={args.device}")
    if args.random_init:
        passthrough.append("--random-init")
    env = dict(os.environ)
    if args.mmap_threshold > 0:
        # A fixed glibc mmap threshold returns every large freed tensor to the OS at once, so peak RSS
        # measures live memory: with the default adaptive threshold identical runs differed by up to
        # 15% in peak RSS (heap fragmentation). Off by default: the extra page faults cost ~1 s of
        # system time per step on a VM, which distorts the step-time ratios.
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    raw: dict[str, dict[str, list]] = {arm: {} for arm in arms}
    meta = {}
    for rep in range(args.repeats):
        order = arms if rep % 2 == 0 else arms[::-1]  # interleave, alternating the order
        for arm in order:
            proc = subprocess.run(
                [sys.executable, __file__, f"--worker={arm}", *passthrough],
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0:
                raise SystemExit(f"arm {arm} failed:\n{proc.stderr[-4000:]}")
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            for key in ("step_s", "peak_mem_mb", "generate_s"):
                if key in res:
                    raw[arm].setdefault(key, []).append(round(res[key], 4))
            raw[arm]["trainable_params"] = res["trainable_params"]
            meta = {"device": res["device"], "torch_threads": res["torch_threads"]}
            print(f"[{rep + 1}/{args.repeats}] {arm}: {res}", file=sys.stderr, flush=True)
    import torch

    report = {
        "moral_over_lora_step": _ratio(raw, "moral", "step_s"),
        "moral_linear_over_lora_step": _ratio(raw, "moral_linear", "step_s"),
        "moral_dense_over_lora_step": _ratio(raw, "moral_dense", "step_s"),
        "moral_over_lora_generate": _ratio(raw, "moral", "generate_s"),
        "moral_over_lora_peak_mem": _ratio(raw, "moral", "peak_mem_mb"),
        "medians": {
            arm: {k: statistics.median(v) for k, v in vals.items() if isinstance(v, list)}
            for arm, vals in raw.items()
        },
        "raw": raw,
        **meta,
        "torch": torch.__version__,
        "setup": {
            "batch": args.batch,
            "seq": args.seq,
            "steps": args.steps,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "new_tokens": args.new_tokens,
            "model_dir": args.model_dir,
            "random_init": args.random_init,
            "malloc_mmap_threshold": env.get("MALLOC_MMAP_THRESHOLD_"),
        },
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
