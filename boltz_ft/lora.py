"""LoRA adapters on the official ``Boltz2`` as a *weight parametrisation* (boltz.md §1.2, LoRA caveat).

Each targeted ``nn.Linear`` (``LinearNoBias`` included) gets a :class:`LoRAParametrization` registered on its
``.weight`` with :func:`torch.nn.utils.parametrize.register_parametrization`, so every read of
``module.weight`` returns ``W + s * B @ A``, with W ``[out, in]``, B ``[out, r]``, A ``[r, in]`` and
``s = scale * alpha / r``. A module-replacing wrapper (PEFT's) would be bypassed by the cuequivariance
triangle-multiplication kernel (``use_kernels=True``), which reads ``p_in.weight`` etc. directly.

Dropout (``dropout > 0``, training mode only): PEFT computes ``W x + s * B @ A @ drop(x)``, an independent
mask per element of the input (per token and feature). That is not a function of the weight alone. Here the
mask is drawn over A's *input columns* at each read of ``.weight``: ``s * B @ (A * m[None, :])``, m ``[in]``
Bernoulli(1 - p) / (1 - p). This is exactly PEFT's dropout with one mask shared by every token of the
forward pass (same expectation, higher variance per step); the base path ``W x`` never sees dropout,
as in PEFT. In eval mode (and in :func:`merge_lora`) no mask is applied.

The adapter scale (:func:`lora_scale`, :func:`set_lora_scale`) multiplies ``alpha / r``; at 0 the
parametrisation returns W itself, so the model is the base model bit for bit: the KL reference of GRPO
needs no model copy (boltz.md §5.1). Each ``.weight`` read recomputes ``B @ A``; wrap a forward in
``torch.nn.utils.parametrize.cached()`` to compute it once per forward when the weight is read repeatedly.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
from typing import Iterable, Iterator

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from elign.engine.errors import ConfigError, check_int, check_range

__all__ = ["LoRAParametrization", "apply_lora", "load_lora_state_dict", "lora_parameters", "lora_scale",
           "lora_state_dict", "merge_lora", "set_lora_scale"]

_KEY = "model.lora"


class LoRAParametrization(nn.Module):
    """``W -> W + scale * (alpha / r) * B @ A`` for a weight W ``[out, in]``.

    Attributes:
        lora_A: ``[r, in]``, Kaiming-uniform (a = sqrt(5)) as PEFT's ``lora_A``.
        lora_B: ``[out, r]``, zeros, so the adapted model equals the base one at step 0.
        scaling: ``alpha / r`` (fixed).
        scale: run-time multiplier of ``scaling`` (1 trained adapter, 0 base model); a plain float, not state.
        dropout: probability of dropping an input column of A in training mode (module docstring).
    """

    def __init__(self, weight: Tensor, r: int, alpha: float, dropout: float,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        out_features, in_features = weight.shape
        # Drawn on CPU so that a seeded CPU generator gives the same A whatever device the model is on.
        a = torch.empty(r, in_features, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        self.lora_A = nn.Parameter(a.to(device=weight.device, dtype=weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=weight.device, dtype=weight.dtype))
        self.scaling = float(alpha) / r
        self.scale = 1.0
        self.dropout = float(dropout)
        self.parameter_order: tuple[str, ...] = ()  # the module's parameter names before registration

    def delta(self, use_dropout: bool | None = None) -> Tensor:
        """``scale * scaling * B @ A`` ``[out, in]`` (A's columns dropped in training mode, module docstring)."""
        a = self.lora_A
        if (self.training if use_dropout is None else use_dropout) and self.dropout > 0:
            keep = torch.empty(a.shape[1], device=a.device, dtype=a.dtype).bernoulli_(1.0 - self.dropout)
            a = a * (keep / (1.0 - self.dropout))
        return (self.lora_B @ a) * (self.scaling * self.scale)

    def forward(self, weight: Tensor) -> Tensor:
        """The effective weight ``[out, in]`` from the base weight W ``[out, in]``."""
        if self.scale == 0:
            return weight  # exactly the base weight (no 0 * B @ A rounding, no NaN propagation, no graph)
        return weight + self.delta().to(weight.dtype)


def _matches(name: str, pattern: str) -> bool:
    """PEFT-like: a pattern without wildcard is a dotted suffix of the name; with one, fnmatch on the name."""
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern or name.endswith("." + pattern)


def _linears(model: nn.Module) -> dict[int, tuple[str, nn.Linear, list[str]]]:
    """Every ``nn.Linear`` once: ``id -> (canonical name, module, all names)``; boltz registers a few modules
    under two names (``output_projection_linear`` is also ``output_projection.0``), and either may be targeted."""
    found: dict[int, tuple[str, nn.Linear, list[str]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, nn.Linear):
            found.setdefault(id(module), (name, module, []))[2].append(name)
    return found


def _lora_of(module: nn.Module) -> LoRAParametrization | None:
    """The LoRA parametrisation on ``module.weight``, if any."""
    if parametrize.is_parametrized(module, "weight"):
        for p in module.parametrizations.weight:
            if isinstance(p, LoRAParametrization):
                return p
    return None


def _adapters(model: nn.Module) -> Iterator[tuple[str, nn.Module, LoRAParametrization]]:
    """``(canonical name, module, parametrisation)`` of every adapted module, in model order."""
    for name, module in model.named_modules():
        p = _lora_of(module)
        if p is not None:
            yield name, module, p


def apply_lora(model: nn.Module, target_modules: Iterable[str] | str, r: int, alpha: float,
               dropout: float = 0.0, seed: int | None = None) -> list[str]:
    """Register LoRA on the ``.weight`` of every ``nn.Linear`` a pattern matches; freeze every base parameter.

    Args:
        model: e.g. the official ``Boltz2`` (modified in place).
        target_modules: patterns on full module names: without wildcard a dotted suffix (``proj_q`` matches
            every ``...proj_q``), with ``*``/``?``/``[`` fnmatch on the full name (``*`` crosses dots).
        r: rank (>= 1). alpha: scaling numerator (``alpha / r``). dropout: in ``[0, 1)``, module docstring.
        seed: seed of A's initialisation (None = the global RNG).
    Returns:
        The adapted module names in model order (the prefixes of :func:`lora_state_dict`'s keys).
    Raises:
        ConfigError: a bad r / alpha / dropout, or a pattern that matches no ``nn.Linear`` (named, with examples).
    """
    r = check_int(f"{_KEY}.r", r, 1)
    alpha = check_range(f"{_KEY}.alpha", alpha, 0.0, low_open=True)
    dropout = check_range(f"{_KEY}.dropout", dropout, 0.0, 1.0, high_open=True)
    patterns = [target_modules] if isinstance(target_modules, str) else [str(p) for p in target_modules]
    if not patterns:
        raise ConfigError(f"{_KEY}.target_modules", patterns, "a non-empty list of module-name patterns")
    linears = _linears(model)
    chosen: set[int] = set()
    for pattern in patterns:
        hits = {key for key, (_, _, names) in linears.items() if any(_matches(n, pattern) for n in names)}
        if not hits:
            names = [canonical for canonical, _, _ in linears.values()]
            examples = ", ".join(names[i] for i in range(0, len(names), max(1, len(names) // 5)))
            raise ConfigError(f"{_KEY}.target_modules", pattern,
                              f"patterns that match nn.Linear module names, as a dotted suffix ('proj_q') or an "
                              f"fnmatch glob ('pairformer_module.layers.*.attention.proj_*'); e.g. {examples}")
        chosen |= hits
    already = [linears[k][0] for k in chosen if _lora_of(linears[k][1]) is not None]
    if already:
        raise RuntimeError(f"LoRA is already applied to {already[:3]}: merge_lora or rebuild the model first")
    for param in model.parameters():
        param.requires_grad_(False)  # only the adapters train
    generator = torch.Generator().manual_seed(int(seed)) if seed is not None else None
    adapted = []
    for key, (name, module, _) in linears.items():  # model order, so a seed gives the same A per module
        if key in chosen:
            lora = LoRAParametrization(module.weight, r, alpha, dropout, generator)
            lora.train(module.training)
            lora.parameter_order = tuple(module._parameters)  # restored by merge_lora: same state-dict order
            parametrize.register_parametrization(module, "weight", lora)
            adapted.append(name)
    return adapted


def set_lora_scale(model: nn.Module, value: float) -> None:
    """Set the scale of every adapter (1 = trained adapter, 0 = the base model exactly)."""
    adapters = list(_adapters(model))
    if not adapters:
        # Silently doing nothing would make a "reference" forward equal the policy (a KL of 0 forever).
        raise ValueError("set_lora_scale: the model has no LoRA adapters (apply_lora first)")
    for _, _, p in adapters:
        p.scale = float(value)


@contextlib.contextmanager
def lora_scale(model: nn.Module, value: float) -> Iterator[nn.Module]:
    """Within the block every adapter has scale ``value``; the previous scales come back afterwards.

    ``with lora_scale(model, 0): ref = model(...)`` is the base model's output without a copy of the model.
    """
    previous = [(p, p.scale) for _, _, p in _adapters(model)]
    set_lora_scale(model, value)
    try:
        yield model
    finally:
        for p, scale in previous:
            p.scale = scale


def lora_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``[(f"{module}.lora_A", A [r, in]), (f"{module}.lora_B", B [out, r]), ...]`` in model order."""
    out: list[tuple[str, nn.Parameter]] = []
    for name, _, p in _adapters(model):
        out += [(f"{name}.lora_A", p.lora_A), (f"{name}.lora_B", p.lora_B)]
    return out


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapters only, keyed ``<module name>.lora_A`` / ``.lora_B`` (independent of torch's
    ``parametrizations.weight.0`` layout); detached tensors sharing storage, as ``nn.Module.state_dict``."""
    return {name: param.detach() for name, param in lora_parameters(model)}


def load_lora_state_dict(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy adapters saved by :func:`lora_state_dict` into a model adapted with the same targets and rank.

    Raises:
        ValueError: missing or unexpected names, or a shape mismatch (strict: nothing is copied then).
    """
    params = dict(lora_parameters(model))
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError(f"LoRA state dict does not match the model's adapters: missing {len(missing)} "
                         f"{missing[:3]}, unexpected {len(unexpected)} {unexpected[:3]}")
    bad = [f"{k}: {tuple(state[k].shape)} vs {tuple(p.shape)}" for k, p in params.items() if state[k].shape != p.shape]
    if bad:
        raise ValueError(f"LoRA state dict shapes differ from the model's adapters (rank?): {bad[:3]}")
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(state[key])


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold ``W + scale * (alpha / r) * B @ A`` (no dropout, the current scale) into each plain ``.weight``
    and remove the parametrisations, in place. The result has exactly the base model's state-dict keys
    (it loads into a fresh ``Boltz2`` with ``strict=True``). Parameters stay frozen as :func:`apply_lora`
    left them; call ``requires_grad_(True)`` to train the merged model. Returns ``model``."""
    for _, module, p in list(_adapters(model)):
        with torch.no_grad():
            base = module.parametrizations.weight.original
            # The same expression as LoRAParametrization.forward, so the merged weight is the adapted one.
            merged = base if p.scale == 0 else base + p.delta(use_dropout=False).to(base.dtype)
            merged = merged.clone()
        if len(module.parametrizations.weight) != 1:
            raise RuntimeError("merge_lora: a LoRA weight carries other parametrisations too")
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        with torch.no_grad():
            module.weight.copy_(merged)  # the original Parameter object: optimiser references stay valid
        # Removal re-registers weight after bias; put it back so the state dict lists keys as the base did.
        order = p.parameter_order
        for key in [k for k in order if k in module._parameters] + [k for k in module._parameters if k not in order]:
            module._parameters[key] = module._parameters.pop(key)
    return model
