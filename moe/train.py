"""Supervised fine-tuning loop for QA pairs, shared by MoRAL, plain LoRA and any HF causal LM.

The model is duck-typed: anything whose forward takes (input_ids, attention_mask) and returns `.logits`.
When it also offers `aux_loss()` (the mixture's balance loss of the last forward) that is added to the LM
loss; when its forward names a `sample_group` parameter it receives each example's group (LoRAMoE's
localized balancing); `expert_stats()` / `reset_stats()` are used when present.

One file (~460 lines): the config, the batching and the loop share the step arithmetic (micro-batches,
schedule, checkpoints), so they are read together.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from moe.base_model import pick_device
from moe.infer import IGNORE, encode_chat, encode_plain, model_device, pad_batch, token_nll


@dataclass
class TrainConfig:
    """Optimisation settings. `batch_size` is the micro-batch; one optimizer step sees batch_size*grad_accum."""

    epochs: int = field(default=2, metadata={"help": "passes over the training examples"})
    learning_rate: float = field(default=1e-3, metadata={"help": "peak AdamW learning rate"})
    batch_size: int = field(default=8, metadata={"help": "examples per forward pass (micro-batch)"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches accumulated per optimizer step"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "fraction of steps with linear warm-up"})
    schedule: str = field(
        default="linear", metadata={"help": "decay after warm-up: 'linear', 'cosine' or 'constant'"}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW decoupled weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0 disables)"})
    max_length: int = field(default=256, metadata={"help": "maximum tokens per example (prompt + answer)"})
    seed: int = field(default=0, metadata={"help": "seed for shuffling and dropout; same seed, same losses"})
    bf16: bool = field(
        default=True, metadata={"help": "bf16 autocast where fast (CUDA with bf16); ignored on CPU"}
    )
    device: str | None = field(
        default=None, metadata={"help": "'cpu', 'cuda', ... (None: CUDA when available)"}
    )
    log_every: int = field(default=10, metadata={"help": "steps between host syncs that report losses"})

    def __post_init__(self) -> None:
        checks = {
            "epochs": self.epochs >= 1,
            "learning_rate": self.learning_rate > 0,
            "batch_size": self.batch_size >= 1,
            "grad_accum": self.grad_accum >= 1,
            "warmup_ratio": 0.0 <= self.warmup_ratio < 1.0,
            "schedule": self.schedule in ("linear", "cosine", "constant"),
            "weight_decay": self.weight_decay >= 0,
            "max_grad_norm": self.max_grad_norm >= 0,
            "max_length": self.max_length >= 8,
            "log_every": self.log_every >= 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(
                f"invalid TrainConfig values: {', '.join(f'{k}={getattr(self, k)!r}' for k in bad)}"
            )


@dataclass
class Example:
    """One training example: a chat QA pair (loss on the answer), open-book when `context` is given, or
    plain `text` (a document passage: no chat template, loss on every token). `sample_group` selects the
    expert group in LoRAMoE-style balancing (0 = world knowledge / default); `weight` multiplies the
    example's token losses (e.g. < 1 for replay pairs).

    ``distill``: the loss at the answer positions is the KL divergence from the *base model's* whole
    next-token distribution (the same model with its adapter disabled, which needs a
    ``disable_adapter()`` context manager, as MoRAL and peft models have) instead of the answer's
    NLL: the adapter is taught to leave the prediction where it was, not only its greedy answer.
    ``plain``: the pair is rendered as plain 'Question: ...\nAnswer: ...' text instead of the chat
    template (the format-neutral prompt of ``moe.infer.answer_nll(chat=False)``)."""

    question: str = ""
    answer: str = ""
    system: str | None = None
    context: str | Sequence[str] | None = None
    sample_group: int = 0
    weight: float = 1.0
    text: str | None = None
    distill: bool = False
    plain: bool = False


@dataclass
class TrainResult:
    losses: list[float]  # LM loss per optimizer step (mean over target tokens)
    aux_losses: list[float]  # auxiliary (balance) loss per optimizer step
    lrs: list[float]
    seconds: float
    steps: int
    tokens: int  # non-padding tokens processed
    target_tokens: int  # tokens the loss was computed on
    device: str
    padded_tokens: int = 0  # positions run, padding included (tokens / padded_tokens: the batches' fill)
    dev_loss: float | None = None
    expert_stats: dict | None = None
    #: (step, score) of every checkpoint scored by ``select``; the model ends at ``best_step``.
    checkpoints: list[tuple[int, float]] = field(default_factory=list)
    best_step: int | None = None
    select_seconds: float = 0.0  # of `seconds`, spent scoring checkpoints (not training)

    def to_dict(self) -> dict:
        return asdict(self)


def format_example(tokenizer, ex: Example, max_length: int) -> dict[str, list[int]]:
    """input_ids and labels (chat-formatted, or plain with ``ex.plain``); labels are -100 except on the
    answer and, in chat, end-of-turn tokens.

    Too-long examples keep the answer and lose prompt tokens from the left (the question and assistant
    header sit at the end of the prompt, so they survive). A `text` example is the passage's tokens
    and end-of-sequence, every one a target (cut at `max_length`).
    """
    if ex.text is not None:
        ids = tokenizer(ex.text.strip(), add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids = ids + [tokenizer.eos_token_id]
        ids = ids[:max_length]
        return {"input_ids": ids, "labels": list(ids)}
    if ex.plain:
        if ex.context is not None:
            raise ValueError("a plain-format example has no context")
        prompt, comp, n_target = encode_plain(tokenizer, ex.question, ex.answer)
    else:
        prompt, comp, n_target = encode_chat(tokenizer, ex.question, ex.answer, ex.context, ex.system)
    comp = comp[: min(n_target, max_length)]  # drop template trailers after the end-of-turn token
    n_target = len(comp)
    prompt = prompt[max(0, len(prompt) + len(comp) - max_length) :]
    labels = [IGNORE] * len(prompt) + comp[:n_target] + [IGNORE] * (len(comp) - n_target)
    return {"input_ids": prompt + comp, "labels": labels}


def _lr_lambda(cfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
    warmup = int(round(cfg.warmup_ratio * total_steps))

    def factor(step: int) -> float:  # `step` = optimizer steps already taken
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(0.0, 1.0 - progress)

    return factor


def length_batches(lengths: Sequence[int], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """One epoch's micro-batches: a random order, then within each window of 32 batches the examples
    sorted by length and cut into batches, and the batches shuffled. Each example is seen once per
    epoch, a batch holds examples of similar length (a 40-token QA pair is not padded to a 400-token
    open-book one), and which examples meet in a batch still changes every epoch."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    window = batch_size * 32
    batches: list[list[int]] = []
    for w in range(0, len(order), window):
        part = sorted(order[w : w + window], key=lambda i: lengths[i])
        batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    perm = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in perm]


def _accepts_sample_group(model) -> bool:
    # Only an explicit parameter counts: peft's forward(**kwargs) would pass it down to the HF model.
    try:
        return "sample_group" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _keeps_logits(model) -> bool:
    """Whether the model's forward computes logits for chosen positions only (``logits_to_keep`` as
    an index tensor): HF causal LMs, and MoRAL / peft models, which pass keyword arguments down to
    theirs (peft's through ``get_base_model()``)."""
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model  # peft
    for _ in range(3):  # MoRAL -> the HF model
        try:
            if "logits_to_keep" in inspect.signature(base.forward).parameters:
                return True
        except (TypeError, ValueError):
            return False
        nxt = getattr(base, "base_model", None) or getattr(base, "model", None)
        if nxt is None or nxt is base:
            return False
        base = nxt
    return False


def _autocast(device: torch.device, cfg: TrainConfig):
    enabled = cfg.bf16 and device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def _kl_from_base(base_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(p_base || p_model) per position, summed over the vocabulary: [..., V] -> [...]."""
    base_logp = F.log_softmax(base_logits.float(), dim=-1)
    return (base_logp.exp() * (base_logp - F.log_softmax(logits.float(), dim=-1))).sum(-1)


def _micro_loss(
    model, batch: dict, weights: torch.Tensor, extra: dict, distill: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sum over target tokens of weight*loss (not yet normalised), and the model's aux loss if any.

    The loss of a target token is its NLL, or for a row of ``distill`` ([B] bool) the KL divergence
    from the base model's distribution at that position (the base forward runs first, without
    gradient and on those rows only, so the aux loss read afterwards is the adapter's)."""
    labels = batch["labels"]
    keep = (labels[:, 1:] != IGNORE).any(0).nonzero().squeeze(1)  # positions that predict a target
    sliced = _keeps_logits(model) and keep.numel() < 0.9 * (labels.shape[1] - 1)
    # The LM head (49k-wide for SmolLM2) runs only where a target is predicted when `sliced`: an
    # open-book example is ~450 prompt tokens and ~15 answer tokens, and its full logits cost more
    # than the rest of the step.
    kwargs = {"logits_to_keep": keep} if sliced else {}
    rows = distill.nonzero().squeeze(1) if distill is not None and bool(distill.any()) else None
    base_logits = None
    if rows is not None:
        off = getattr(model, "disable_adapter", None)
        if not callable(off):
            raise ValueError("distill examples need a model with a disable_adapter() context manager")
        sub = {k: v[rows] for k, v in extra.items()}
        with torch.no_grad(), off():
            base_logits = model(
                input_ids=batch["input_ids"][rows],
                attention_mask=batch["attention_mask"][rows],
                **kwargs,
                **sub,
            ).logits
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs, **extra)
    if sliced:
        logits = out.logits.float()  # [b, len(keep), V]
        targets = labels[:, 1:][:, keep]
    else:
        logits, targets = out.logits[:, :-1].float(), labels[:, 1:]
    nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")
    if rows is not None:
        base = base_logits if sliced else base_logits[:, :-1]
        kl = _kl_from_base(base, logits[rows]) * (targets[rows] != IGNORE)
        nll = nll.index_copy(0, rows, kl)
    lm_sum = (nll.sum(1) * weights).sum()
    aux_fn = getattr(model, "aux_loss", None)
    aux = aux_fn() if callable(aux_fn) else None
    return lm_sum, aux


def _encode_all(tokenizer, examples: Sequence[Example], max_length: int) -> list[dict]:
    encoded = []
    for ex in examples:
        enc = format_example(tokenizer, ex, max_length)
        enc["n_target"] = sum(1 for t in enc["labels"][1:] if t != IGNORE)  # positions scored after the shift
        enc["group"], enc["weight"], enc["distill"] = ex.sample_group, ex.weight, ex.distill
        encoded.append(enc)
    return encoded


def _collate(
    items: list[dict], pad_id: int, device: torch.device, with_group: bool
) -> tuple[dict, torch.Tensor, dict]:
    batch = pad_batch([it["input_ids"] for it in items], pad_id, labels=[it["labels"] for it in items])
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    weights = torch.tensor([it["weight"] for it in items], dtype=torch.float32, device=device)
    extra = {}
    if with_group:
        extra["sample_group"] = torch.tensor([it["group"] for it in items], dtype=torch.long, device=device)
    distill = None
    if any(it["distill"] for it in items):
        distill = torch.tensor([it["distill"] for it in items], dtype=torch.bool, device=device)
    return batch, weights, extra, distill


def train(
    model,
    tokenizer,
    examples: Sequence[Example],
    cfg: TrainConfig,
    callback: Callable[[dict], None] | None = None,
    dev_examples: Sequence[Example] | None = None,
    select: Callable[[object], float] | None = None,
    select_every: int | None = None,
) -> TrainResult:
    """Fine-tune the trainable parameters of `model` on chat-formatted QA pairs (AdamW, warm-up + decay).

    The loss of one optimizer step is the mean over all target tokens of its micro-batches (normalised by
    the step's total token count, so grad_accum=2 x batch 4 equals batch 8), plus the model's aux loss
    averaged over micro-batches. `callback` gets {step, epoch, loss, aux_loss, lr, seconds} for every
    step, delivered in groups every `log_every` steps (the only host syncs in the loop).

    ``select(model) -> score`` (higher is better; e.g. dev recall) is called every ``select_every``
    optimizer steps and after the last; the trainable parameters of the best-scoring step are kept
    (the latest of equal scores: more training, same dev recall) and restored at the end, so training
    can run past the best step without losing it.
    """
    if not examples:
        raise ValueError("no training examples")
    device = pick_device(cfg.device)
    model.to(device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    encoded = _encode_all(tokenizer, examples, cfg.max_length)
    with_group = any(e.sample_group for e in examples) and _accepts_sample_group(model)

    micro_per_epoch = math.ceil(len(encoded) / cfg.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.grad_accum)
    total_steps = cfg.epochs * steps_per_epoch
    torch.manual_seed(cfg.seed)  # dropout masks (and any other RNG use inside the model)
    shuffle_gen = torch.Generator().manual_seed(cfg.seed)
    optimizer = torch.optim.AdamW(
        params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=device.type == "cuda"
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg, total_steps))
    if callable(getattr(model, "reset_stats", None)):
        model.reset_stats()

    losses: list[float] = []
    aux_losses: list[float] = []
    lrs: list[float] = []
    pending: list[tuple[dict, torch.Tensor, torch.Tensor]] = []  # per-step records awaiting a host sync
    zero = torch.zeros((), device=device)
    tokens = target_tokens = padded = 0
    start = time.perf_counter()

    def flush() -> None:
        if not pending:
            return
        values = torch.stack([torch.stack([lm, aux]) for _, lm, aux in pending]).tolist()  # one sync
        for (record, _, _), (lm, aux) in zip(pending, values, strict=True):
            record.update(loss=lm, aux_loss=aux)
            losses.append(lm)
            aux_losses.append(aux)
            if callback is not None:
                callback(record)
        pending.clear()

    checkpoints: list[tuple[int, float]] = []
    best: dict = {"score": None, "step": None, "state": None}

    select_seconds = [0.0]

    def checkpoint(at: int) -> None:
        t0 = time.perf_counter()
        track = getattr(model, "set_track_stats", None)
        was = getattr(getattr(model, "_stats", None), "enabled", True)
        if callable(track):
            track(False)  # dev generation is not training: the router statistics leave it out
        try:
            score = float(select(model))  # type: ignore[misc]
        finally:
            if callable(track):
                track(was)
        model.train()
        select_seconds[0] += time.perf_counter() - t0
        checkpoints.append((at, score))
        if best["score"] is None or score >= best["score"]:  # a tie goes to the later step
            best.update(score=score, step=at, state=[p.detach().clone() for p in params])

    model.train()
    step = 0
    for epoch in range(cfg.epochs):
        micro = length_batches([len(e["input_ids"]) for e in encoded], cfg.batch_size, shuffle_gen)
        for s in range(0, len(micro), cfg.grad_accum):
            window = micro[s : s + cfg.grad_accum]
            n_step_targets = max(1, sum(encoded[i]["n_target"] for mb in window for i in mb))
            step_lm, step_aux = zero.clone(), zero.clone()
            for mb in window:
                items = [encoded[i] for i in mb]
                batch, weights, extra, distill = _collate(items, pad_id, device, with_group)
                with _autocast(device, cfg):
                    lm_sum, aux = _micro_loss(model, batch, weights, extra, distill)
                lm = lm_sum / n_step_targets  # this micro-batch's share of the step's mean
                loss = lm if aux is None else lm + aux / len(window)
                loss.backward()
                step_lm += lm.detach()
                if aux is not None:
                    step_aux += aux.detach() / len(window)
                tokens += sum(len(it["input_ids"]) for it in items)
                padded += len(items) * max(len(it["input_ids"]) for it in items)
                target_tokens += sum(it["n_target"] for it in items)
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            lrs.append(lr)
            record = {"step": step, "epoch": epoch, "lr": lr, "seconds": time.perf_counter() - start}
            pending.append((record, step_lm, step_aux))
            if step % cfg.log_every == 0:
                flush()
            if select is not None and select_every and step % select_every == 0 and step < total_steps:
                flush()
                checkpoint(step)
    flush()
    if select is not None:
        checkpoint(step)
        if best["step"] != step:
            with torch.no_grad():
                for p, saved in zip(params, best["state"], strict=True):
                    p.copy_(saved)
    model.eval()
    seconds = time.perf_counter() - start

    dev_loss = (
        evaluate_loss(model, tokenizer, dev_examples, cfg.batch_size, cfg.max_length)
        if dev_examples
        else None
    )
    stats_fn = getattr(model, "expert_stats", None)
    stats = stats_fn() if callable(stats_fn) else None
    return TrainResult(
        losses=losses,
        aux_losses=aux_losses,
        lrs=lrs,
        seconds=seconds,
        steps=step,
        tokens=tokens,
        target_tokens=target_tokens,
        device=str(device),
        padded_tokens=padded,
        dev_loss=dev_loss,
        expert_stats=stats,
        checkpoints=checkpoints,
        best_step=best["step"],
        select_seconds=select_seconds[0],
    )


@torch.inference_mode()
def evaluate_loss(
    model, tokenizer, examples: Sequence[Example], batch_size: int = 8, max_length: int = 256
) -> float:
    """Mean target-token loss (answer + end-of-turn, as in training) over `examples`, token-weighted."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = _encode_all(tokenizer, examples, max_length)
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    for i in range(0, len(encoded), batch_size):
        items = encoded[i : i + batch_size]
        batch, _, _, _ = _collate(items, pad_id, device, with_group=False)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        total += token_nll(logits, batch["labels"]).sum().double()
        count += sum(it["n_target"] for it in items)
    model.train(was_training)
    return float(total) / max(1, count)
