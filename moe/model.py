"""MoRALModel: LoRA experts and routers injected into a frozen transformers causal LM."""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from . import losses
from .config import DEFAULT_TARGETS, FORMAT_VERSION, MoRALConfig
from .layer import INPUT_SIDE_NAMES, BlockRouter, MoRALLinear, linear_features
from .router import ExpertStats, Router, RoutingContext

WEIGHTS_NAME = "adapter_model.safetensors"
_ADAPTER_MARK = "moral_"  # every adapter parameter name has a component starting with this


def _is_linear(module: nn.Module) -> bool:
    try:
        linear_features(module)
    except TypeError:
        return False
    return True


def _suffixes(model: nn.Module) -> list[str]:
    """Distinct linear-module names with the layer index dropped (for error messages)."""
    found = {re.sub(r"^.*?\.\d+\.", "", name) for name, m in model.named_modules() if _is_linear(m)}
    return sorted(found)


def resolve_target_modules(model: nn.Module, targets: list[str] | None) -> list[str]:
    """Full names of the modules to adapt: ``targets`` are name suffixes (None: by architecture)."""
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGETS:
            raise ValueError(
                f"no default MoRAL targets for architecture {model_type!r} (known: {sorted(DEFAULT_TARGETS)}); "
                f"set target_modules, e.g. from the linear modules found: {_suffixes(model)}"
            )
        targets = DEFAULT_TARGETS[model_type]
    names = []
    for name, module in model.named_modules():
        if any(name == t or name.endswith("." + t) for t in targets):
            if not _is_linear(module):
                raise TypeError(
                    f"target {name} is a {type(module).__name__}; MoRAL adapts linear layers only"
                )
            names.append(name)
    if not names:
        raise ValueError(
            f"target_modules {targets} match no module; linear modules found: {_suffixes(model)}"
        )
    return names


_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight$")


def read_peft_lora(directory: str | Path) -> dict[str, tuple[Tensor, Tensor, float]]:
    """Read a stock peft LoRA directory: {module name in the base model: (A [r, d_in], B [d_out, r], scale)}.

    scale is the LoRA's own alpha/r (alpha/sqrt(r) with rsLoRA; ``alpha_pattern`` honoured).
    """
    directory = Path(directory)
    config_path, weights_path = directory / "adapter_config.json", directory / WEIGHTS_NAME
    if not config_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(
            f"{directory} is not a peft adapter (needs adapter_config.json and {WEIGHTS_NAME})"
        )
    cfg = json.loads(config_path.read_text())
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{directory}: expected a peft LORA adapter, got peft_type={cfg.get('peft_type')!r}")
    if cfg.get("use_dora"):
        raise ValueError(f"{directory}: DoRA adapters cannot become plain LoRA experts")
    parts: dict[str, dict[str, Tensor]] = {}
    for key, tensor in load_file(str(weights_path)).items():
        match = _PEFT_KEY.match(key)
        if match:
            parts.setdefault(match["module"], {})[match["part"]] = tensor.float()
    alpha_pattern = cfg.get("alpha_pattern") or {}
    out = {}
    for module, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{directory}: {module} has only lora_{next(iter(ab))}")
        rank = ab["A"].shape[0]
        alpha = next(
            (v for k, v in alpha_pattern.items() if re.fullmatch(rf"(.*\.)?{k}", module)),
            cfg.get("lora_alpha", 8),
        )
        out[module] = (ab["A"], ab["B"], alpha / (math.sqrt(rank) if cfg.get("use_rslora") else rank))
    if not out:
        raise ValueError(f"{directory}: no lora_A/lora_B tensors found")
    return out


def _hidden_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    size = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    return int(size) if size else model.get_input_embeddings().embedding_dim


class MoRALModel(nn.Module):
    """A frozen causal LM with MoRAL experts on its FFN linears (peft-like wrapper).

    ``.config`` and any other unknown attribute are the base model's (so generation utilities work);
    the adapter's own configuration is ``.moral_config``.
    """

    def __init__(self, base_model: nn.Module, config: MoRALConfig) -> None:
        super().__init__()
        if any(isinstance(m, MoRALLinear) for m in base_model.modules()):
            raise ValueError("this base model already carries MoRAL adapters; load a fresh copy of it")
        self.base_model = base_model
        for p in base_model.parameters():
            p.requires_grad_(False)
        names = resolve_target_modules(base_model, config.target_modules)
        suffixes = sorted({re.sub(r"^.*?\.\d+\.", "", n) for n in names})
        self.moral_config = MoRALConfig.from_dict({**config.to_dict(), "target_modules": suffixes})
        self._context = RoutingContext()
        self.layers: dict[str, MoRALLinear] = {}
        self.routers: dict[str, Router] = {}
        self._hooks = [base_model.register_forward_pre_hook(self._capture_inputs, with_kwargs=True)]
        self._inject(names)
        self._stats = ExpertStats(self.routers)
        self.train(base_model.training)  # new modules (dropout!) follow the base model's mode

    # ----------------------------------------------------------------------------------- injection
    def _inject(self, names: list[str]) -> None:
        cfg, blocks = self.moral_config, {}
        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = self.base_model.get_submodule(parent_name)
            base_layer = getattr(parent, child)
            router = None
            if cfg.router_scope == "linear":
                in_features, _ = linear_features(base_layer)
                router = Router(in_features, **cfg.router_options(), device=base_layer.weight.device)
                self._new_router(router, name)
            layer = MoRALLinear(base_layer, cfg, router)
            setattr(parent, child, layer)
            self.layers[name] = layer
            blocks.setdefault(parent_name, {})[child] = layer
        if cfg.router_scope == "block":
            for block_name, linears in blocks.items():
                block = self.base_model.get_submodule(block_name)
                input_side = [lyr.in_features for c, lyr in linears.items() if c in INPUT_SIDE_NAMES]
                in_features = input_side[0] if input_side else _hidden_size(self.base_model)
                device = next(iter(linears.values())).moral_A.device
                router = self._new_router(BlockRouter(in_features, cfg, device), block_name)
                block.add_module("moral_router", router)
                self._hooks += router.attach(block, linears)

    def _new_router(self, router: Router, name: str) -> Router:
        router.context = self._context  # one shared context: the attention mask reaches every router
        self.routers[name] = router
        return router

    def _capture_inputs(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        # Runs before every base-model forward, including each step of ``generate``: count the
        # previous forward's routing, then publish this forward's mask to every router.
        self._stats.update()
        self._context.attention_mask = kwargs.get("attention_mask")

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":  # not constructed yet: avoid infinite recursion
                raise
            return getattr(self.base_model, name)

    # -------------------------------------------------------------------------------- forward/generate
    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        sample_group: Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """The base model's forward (HF output); ``sample_group`` [B] feeds the localized balance loss."""
        if sample_group is not None:
            sample_group = torch.as_tensor(sample_group)
            if sample_group.dim() != 1 or sample_group.dtype.is_floating_point:
                raise ValueError("sample_group must be a 1-D integer tensor with one id per sample")
            if sample_group.device.type == "cpu" and sample_group.numel():  # checked without a device sync
                if int(sample_group.min()) < 0 or int(sample_group.max()) >= self.moral_config.expert_groups:
                    raise ValueError(f"sample_group ids must be in [0, {self.moral_config.expert_groups})")
        self._context.sample_group = sample_group
        return self.base_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The base model's ``generate`` (KV cache included) through the adapted layers."""
        self._context.sample_group = None
        return self.base_model.generate(*args, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.base_model.parameters()).device

    # ----------------------------------------------------------------------------- losses and stats
    def aux_loss(self) -> Tensor:
        """Weighted balance + z loss of the most recent forward (zero tensor when there is none).

        switch and z-loss are averaged over routers (Mixtral's scale whatever the depth); the
        localized constraint is summed over routers, as LoRAMoE does.
        """
        cfg = self.moral_config
        records = [r.last for r in self.routers.values() if r.last is not None]
        total = torch.zeros((), device=self.device)
        if not records:
            return total
        if cfg.balance_loss == "switch" and cfg.balance_coef > 0:
            per_router = [losses.switch_balance_loss(r.probs, r.topk_idx, r.mask) for r in records]
            total = total + cfg.balance_coef * torch.stack(per_router).mean()
        elif cfg.balance_loss == "localized" and cfg.balance_coef > 0:
            for r in records:
                if len(r.batch_shape) != 2:
                    raise ValueError("the localized balance loss needs [B, S, d] inputs")
                gates = r.gates.view(*r.batch_shape, -1) / r.scale  # [T, E] -> [B, S, E], unscaled
                mask = None if r.mask is None else r.mask.view(r.batch_shape)  # [T] -> [B, S]
                loss = losses.localized_balance_loss(
                    gates, mask, r.sample_group, cfg.expert_groups, cfg.localized_delta
                )
                total = total + cfg.balance_coef * loss
        if cfg.z_loss_coef > 0:
            per_router = [losses.router_z_loss(r.logits, r.mask) for r in records]
            total = total + cfg.z_loss_coef * torch.stack(per_router).mean()
        return total

    def expert_stats(self) -> dict[str, dict[str, list[float]]]:
        """Per router: ``load`` (fraction of real tokens sent to each expert, sums to top_k),
        ``importance`` (mean router probability, sums to 1) and ``tokens``, since ``reset_stats``.
        Padding is excluded. The only call here that syncs with the device."""
        return self._stats.report()

    def reset_stats(self) -> None:
        self._stats.reset()

    def set_track_stats(self, enabled: bool) -> None:
        """Turn the (cheap, on-device, batched) load/importance accumulation on or off."""
        self._stats.enabled = enabled

    # ------------------------------------------------------------------------------ enable/disable
    def _set_enabled(self, enabled: bool) -> None:
        for module in [*self.layers.values(), *self.routers.values()]:
            module.enabled = enabled
        if not enabled:
            self._stats.update()  # count what ran before the switch
            for router in self.routers.values():
                router.last = None

    def enable_adapter_layers(self) -> None:
        self._set_enabled(True)

    def disable_adapter_layers(self) -> None:
        """Bypass every expert: outputs are bit-identical to the base model's."""
        self._set_enabled(False)

    @property
    def adapters_enabled(self) -> bool:
        return all(layer.enabled for layer in self.layers.values())

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Context manager running the exact base model; restores the previous state on exit."""
        previous = self.adapters_enabled
        self._set_enabled(False)
        try:
            yield
        finally:
            self._set_enabled(previous)

    # ---------------------------------------------------------------------------- parameters / IO
    def adapter_state_dict(self) -> dict[str, Tensor]:
        """Adapter tensors only (experts and routers), keyed by their name in the base model."""
        return {
            n: p
            for n, p in self.base_model.named_parameters()
            if any(part.startswith(_ADAPTER_MARK) for part in n.split("."))
        }

    def trainable_parameters_report(self) -> dict[str, float | int]:
        """Counts of trainable / total parameters (experts and routers apart) and the trainable %."""
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        routers = sum(r.weight.numel() for r in self.routers.values())
        return {
            "trainable": trainable,
            "total": total,
            "percent": 100.0 * trainable / max(total, 1),
            "experts": sum(p.numel() for p in self.adapter_state_dict().values()) - routers,
            "routers": routers,
        }

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (adapter tensors only)."""
        directory = Path(directory)
        self.moral_config.save(directory)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.adapter_state_dict().items()}
        meta = {"format": "pt", "adapter_type": "moral", "format_version": str(FORMAT_VERSION)}
        save_file(tensors, str(directory / WEIGHTS_NAME), metadata=meta)

    def load_adapter_state_dict(self, tensors: dict[str, Tensor]) -> None:
        """Copy adapter tensors in, with clear errors on missing/unexpected keys or shape mismatch."""
        own = self.adapter_state_dict()
        missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        if missing or unexpected:
            raise ValueError(
                f"adapter weights do not fit this model: {len(missing)} missing (e.g. {missing[:3]}), "
                f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}); was it saved for another base model "
                f"or config? (recorded base: {self.moral_config.base_model_name_or_path!r})"
            )
        wrong = [
            f"{k}: file {list(tensors[k].shape)} vs model {list(own[k].shape)}"
            for k in own
            if tensors[k].shape != own[k].shape
        ]
        if wrong:
            raise ValueError(
                "adapter tensor shapes do not match the base model (different hidden/FFN size?): "
                + "; ".join(wrong[:3])
                + (f" (+{len(wrong) - 3} more)" if len(wrong) > 3 else "")
            )
        with torch.no_grad():
            for k, p in own.items():
                p.copy_(tensors[k])

    @classmethod
    def from_pretrained(
        cls,
        base_model: nn.Module,
        directory: str | Path,
        *,
        expected_base_sha256: str | None = None,
        is_trainable: bool = False,
    ) -> MoRALModel:
        """Load a saved adapter onto ``base_model``; frozen and in eval mode unless ``is_trainable``."""
        directory = Path(directory)
        config = MoRALConfig.load(directory)
        recorded = config.base_model_sha256
        if expected_base_sha256 and recorded and recorded != expected_base_sha256:
            raise ValueError(
                f"adapter in {directory} was trained on base sha256 {recorded[:12]}…, "
                f"but the given base model is {expected_base_sha256[:12]}…"
            )
        weights = directory / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}")
        model = cls(base_model, config)
        model.load_adapter_state_dict(load_file(str(weights)))
        if not is_trainable:
            for p in model.adapter_state_dict().values():
                p.requires_grad_(False)
            model.eval()
        return model

    def init_experts_from_lora(
        self, peft_adapter_dirs: list[str | Path], expert_indices: list[int] | None = None
    ) -> dict[int, dict[str, list[str]]]:
        """Initialise experts from peft LoRA adapters of the same base model (one adapter per expert).

        A LoRA of rank r_l <= rank fills the expert's first r_l rows of A and of (transposed) B; its
        other B rows are zeroed (their A rows keep their random init so they can still learn), so the
        expert's delta equals the LoRA's exactly. r_l > rank raises (truncation would change the
        delta). B is rescaled by (alpha_l/r_l) / (alpha/rank) to compensate the scaling difference.
        Returns, per expert, the modules loaded, left at their init ("missing"), and ignored.
        """
        dirs = [Path(d) for d in peft_adapter_dirs]
        indices = list(range(len(dirs))) if expert_indices is None else list(expert_indices)
        cfg = self.moral_config
        if len(indices) != len(dirs) or len(set(indices)) != len(indices):
            raise ValueError("expert_indices must list one distinct expert per adapter directory")
        if any(not 0 <= i < cfg.num_experts for i in indices):
            raise ValueError(f"expert indices must be in [0, {cfg.num_experts}), got {indices}")
        report = {}
        r = cfg.rank
        for expert, directory in zip(indices, dirs, strict=True):
            lora = read_peft_lora(directory)
            loaded = []
            for name, layer in self.layers.items():
                if name not in lora:
                    continue
                a, b, scale = lora[name]  # [r_l, d_in], [d_out, r_l], alpha_l / r_l
                r_l = a.shape[0]
                if r_l > r:
                    raise ValueError(f"{directory}: LoRA rank {r_l} at {name} exceeds the expert rank {r}")
                if a.shape[1] != layer.in_features or b.shape[0] != layer.out_features:
                    raise ValueError(f"{directory}: LoRA shapes at {name} do not fit the base model")
                rows = slice(expert * r, expert * r + r_l)
                with torch.no_grad():  # moral_B is stored transposed: [E*r, d_out]
                    layer.moral_A[rows].copy_(a)
                    layer.moral_B[expert * r : (expert + 1) * r].zero_()
                    layer.moral_B[rows].copy_(b.t() * (scale / layer.scaling))
                loaded.append(name)
            if not loaded:
                raise ValueError(f"{directory}: the LoRA adapts none of this model's MoRAL modules")
            report[expert] = {
                "loaded": loaded,
                "missing": sorted(set(self.layers) - set(loaded)),
                "ignored": sorted(set(lora) - set(self.layers)),
            }
        return report


def load_adapter(base: nn.Module, adapter_dir: Path) -> nn.Module:
    """A saved adapter on ``base``: a MoRAL adapter, or a plain peft LoRA (the comparison baseline),
    told apart by its ``adapter_config.json``."""
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    if config.get("adapter_type") == "moral":
        return MoRALModel.from_pretrained(base, adapter_dir)
    from .lora import load_lora

    return load_lora(base, adapter_dir)
