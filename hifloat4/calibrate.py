"""Plain-PyTorch calibration: observe the main Linear inputs while a sampling loop
runs, then turn the observations into a PTQ state.

The pieces are separate so that each caller uses only what it needs:
* `LayerObservation` - what one layer records per forward call (ChannelStats and a
  TokenSample); the ComfyUI node's observers feed the same class. Layers that read
  the same input tensor (q/k/v of self-attention read one normed x; k/v of every
  block's cross-attention read one context) share its per-call statistics and
  sampled rows through `SHARED_INPUTS`: measured once per distinct input.
* `observe(model, names, config)` - a context manager putting forward pre-hooks on
  Linear layers that feed `LayerObservation`s; the hooks are removed in `finally`.
* `build_state({expert: ExpertObservation}, config)` - weight absmax, channel masks,
  tails, per-layer output errors, fingerprints and metadata -> `PTQState`. The node
  builds its state here too, passing ComfyUI's real-valued weights and fingerprint.
* `calibrate(experts, run, config)` - both of the above around a callable `run()`
  that drives the models (e.g. `sample_two_expert` over a few prompts).
The sampler that drives the models in the demo and tests is hifloat4.sampling.
"""
from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from . import rotation as hrotation
from . import wan
from .masks import make_layer_state
from .rotation import Rotation
from .sensitivity import TokenSample, layer_errors, to_device
from .smoothing import MaskConfig, Statistic, weight_absmax
from .state import ExpertState, PTQState
from .stats import ChannelStats

# --------------------------------------------------------------------------- config

@dataclass(frozen=True)
class CalibConfig:
    """How statistics become masks. Defaults are the paper's: p99.9 tail, alpha 0.5.
    `sample_tokens`: input tokens kept per layer to measure its W4A4 output error
    (64: an A14B expert's samples then hold 0.2 GB of bf16)."""

    percentile: float = 99.9
    alpha: float = 0.5
    statistic: Statistic = "tail"
    rotation: Rotation | None = None
    sample_tokens: int = 64

    def __post_init__(self) -> None:
        self.mask_config()  # validates alpha and statistic with MaskConfig's own checks
        p = self.percentile
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 100.0:
            raise ValueError(f"CalibConfig.percentile must be in (0, 100], got {p!r}")
        if self.rotation is not None and not isinstance(self.rotation, Rotation):
            raise ValueError(f"CalibConfig.rotation must be a Rotation or None, got {self.rotation!r}")
        n = self.sample_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"CalibConfig.sample_tokens must be an int >= 1, got {n!r}")

    def mask_config(self) -> MaskConfig:
        return MaskConfig(alpha=self.alpha, statistic=self.statistic)


# --------------------------------------------------------------------------- observation

class SharedInputs:
    """Per-input results (a call's CallStats, its sampled rows) of the tensors observers
    are given, so that layers reading the same tensor compute them once.

    A record is keyed on the tensor object itself, held weakly: it lives exactly as
    long as its tensor (memory is bounded by the live inputs, and a later tensor at a
    reused address can never hit it), and on the tensor's version counter, shape and
    strides, so an in-place change starts a new record. Inference-mode tensors have no
    version counter: an in-place change between two layers reading one inference
    tensor would go unseen (Wan's layers never write to their inputs).
    """

    def __init__(self) -> None:
        self._records: dict[int, tuple[weakref.ref, tuple, dict[Hashable, Any]]] = {}

    def results(self, x: Tensor) -> dict[Hashable, Any]:
        """The (mutable) results shared by every observation of x as it is now."""
        key = id(x)
        identity = (None if x.is_inference() else x._version, tuple(x.shape), x.stride())
        record = self._records.get(key)
        if record is not None and record[0]() is x and record[1] == identity:
            return record[2]
        ref = weakref.ref(x, lambda dead, key=key: self._forget(key, dead))
        self._records[key] = (ref, identity, {})
        return self._records[key][2]

    def _forget(self, key: int, dead: weakref.ref) -> None:
        record = self._records.get(key)
        if record is not None and record[0] is dead:
            del self._records[key]

    def __len__(self) -> int:
        return len(self._records)


SHARED_INPUTS = SharedInputs()


def _memo(results: dict[Hashable, Any], key: Hashable, compute: Callable[[], Any]) -> Any:
    if key not in results:
        results[key] = compute()
    return results[key]


class LayerObservation:
    """Everything calibration records about one Linear's inputs, one `update` per call:
    the per-channel statistics and the token sample for its output error. An input
    that another observation already measured (the same tensor, see SharedInputs) is
    not measured again: its statistics and kept rows are reused."""

    def __init__(self, channels: int, config: CalibConfig, device: torch.device | str | None = None) -> None:
        self.stats = ChannelStats(channels, config.percentile, device=device)
        self.sample = TokenSample(channels, capacity=config.sample_tokens, device=device)

    def update(self, x: Tensor) -> None:
        shared = SHARED_INPUTS.results(x)
        x = x.detach()
        call = _memo(shared, ("stats", self.stats.percentiles), lambda: self.stats.measure(x))
        if call is None:  # no tokens: not a call
            return
        self.stats.fold(call)
        self.sample.update(x, rows=lambda: _memo(shared, ("rows", *self.sample.rows_key(x)),
                                                 lambda: self.sample.rows(x)))


@dataclass(frozen=True)
class ExpertObservation:
    """One expert's calibration: its Wan model (layer policy, variant), the observations,
    and where its real-valued weights and fingerprint come from (default: the model's
    nn.Linear weights and `wan.fingerprint(model)`; ComfyUI passes LoRA-merged,
    dequantized weights and the fingerprint of its unpatched model)."""

    model: nn.Module
    layers: Mapping[str, LayerObservation]
    weight: Callable[[str], Tensor] | None = None
    fingerprint: dict | None = None


def _resolve_linears(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Linear]:
    """Wan-relative layer names -> the nn.Linear modules (a key prefix such as
    "diffusion_model." is found the way hifloat4.wan finds it)."""
    modules = dict(model.named_modules())
    prefix = wan.find_prefix(n for n, m in modules.items() if isinstance(m, nn.Linear))
    found, bad = {}, []
    for name in names:
        m = modules.get(prefix + name)
        if isinstance(m, nn.Linear):
            found[name] = m
        else:
            bad.append(name)
    if bad:
        raise ValueError(f"not nn.Linear layers of this model: {bad[:5]}{' ...' if len(bad) > 5 else ''}")
    return found


@contextlib.contextmanager
def observe(model: nn.Module, layer_names: Sequence[str] | None = None,
            config: CalibConfig = CalibConfig()) -> Iterator[dict[str, LayerObservation]]:
    """Record a LayerObservation of each named Linear's input while the block runs.

    `layer_names` default to the Wan main layers (`wan.main_linear_names`). Each
    forward call is one update (so cond+uncond batched together form one call).
    The hooks are removed on exit, also when the block raises.
    """
    names = wan.main_linear_names(model) if layer_names is None else list(layer_names)
    linears = _resolve_linears(model, names)
    observed = {n: LayerObservation(m.in_features, config, device=m.weight.device) for n, m in linears.items()}
    handles = []
    try:
        for name, module in linears.items():
            handles.append(module.register_forward_pre_hook(_observer(observed[name])))
        yield observed
    finally:
        for h in handles:
            h.remove()


def _observer(observation: LayerObservation):
    def hook(module: nn.Module, args: tuple) -> None:
        observation.update(args[0])
    return hook


# --------------------------------------------------------------------------- state

def _to_host(tensors: Sequence[Tensor]) -> list[Tensor]:
    """The tensors on the CPU in one device->host transfer (one sync, not one each)."""
    if not tensors:
        return []
    device = tensors[0].device
    flat = torch.cat([t.detach().to(device, torch.float32).reshape(-1) for t in tensors]).cpu()
    return [part.view(t.shape).clone() for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def _layer_names(ex: ExpertObservation) -> list[str]:
    """The observed layers in policy order; refuses layers never called or not Wan main layers."""
    empty = [n for n, o in ex.layers.items() if o.stats.calls == 0]
    if empty:
        raise ValueError(f"{len(empty)} layer(s) never saw an input during calibration (e.g. {empty[0]}): "
                         f"was this expert ever called?")
    names = [n for n in wan.main_linear_names(ex.model) if n in ex.layers]
    if set(names) != set(ex.layers):
        raise ValueError(f"statistics for layers that are not Wan main layers: "
                         f"{sorted(set(ex.layers) - set(names))[:5]}")
    return names


def expert_state(ex: ExpertObservation, config: CalibConfig) -> ExpertState:
    """Masks, statistics and output errors of one expert, streamed layer by layer.

    Built with `masks.make_layer_state` (statistics rounded to their storage dtypes,
    the mask derived from the rounded values), so `masks.remask` with the same
    settings reproduces the masks bit for bit (the clamp is MaskConfig's, fixed).
    Each layer's weight is read once: its absmax and the layer's statistics reach the
    host in one transfer (the mask is made there), then the layer's errors are queued
    on the device; only per-layer vectors outlive the layer, and all errors are read
    back in one transfer at the end.
    """
    names = _layer_names(ex)
    if ex.weight is None:
        linears = _resolve_linears(ex.model, names)
        weight = lambda name: linears[name].weight.detach()  # noqa: E731
    else:
        weight = ex.weight
    base, errors = {}, []
    for name in names:
        w, stats = weight(name), ex.layers[name].stats
        wmax, absmax, tail, tails = _to_host([to_device(weight_absmax(w), stats.device),
                                              stats.absmax, stats.tail, stats.tails])
        base[name] = make_layer_state(wmax, absmax, tail, alpha=config.alpha, statistic=config.statistic,
                                      tails=tails)
        errors.append(layer_errors(ex.layers[name].sample, w, base[name], config.alpha, config.rotation))
    layers = {n: dataclasses.replace(base[n], errors=e) for n, e in zip(names, _to_host(errors))}
    fingerprint = wan.fingerprint(ex.model) if ex.fingerprint is None else ex.fingerprint
    return ExpertState(layers=layers, fingerprint=fingerprint)


def build_state(experts: Mapping[str, ExpertObservation], config: CalibConfig,
                calibration: Mapping | None = None, extra: Mapping | None = None,
                patches: Mapping[str, list] | None = None) -> PTQState:
    """PTQState from each expert's observations.

    `calibration` (settings such as prompts, steps, cfg, seed, switch step) is stored
    as given, plus per-expert forward calls and tokens observed. `patches`: per expert,
    the hifloat4.patchset record of the weight patches (LoRAs) the model carried.
    """
    if not experts:
        raise ValueError("no experts to build a state from")
    variants = {name: wan.detect_variant(ex.model) for name, ex in experts.items()}
    kinds = {(v.family, v.variant) for v in variants.values()}
    if len(kinds) > 1:
        described = "; ".join(f"{n}: {v.describe()}" for n, v in variants.items())
        raise ValueError(f"experts are different models ({described})")
    family, variant = kinds.pop()
    calib = dict(calibration or {})
    calib["observed"] = {name: {"calls": max((o.stats.calls for o in ex.layers.values()), default=0),
                                "tokens": max((o.stats.tokens for o in ex.layers.values()), default=0)}
                         for name, ex in experts.items()}
    return PTQState(
        experts={name: expert_state(ex, config) for name, ex in experts.items()},
        alpha=float(config.alpha), percentile=float(config.percentile), statistic=config.statistic,
        rotation=hrotation.to_meta(config.rotation), model_family=family, model_variant=variant,
        calibration=calib, extra=dict(extra or {}), patches=None if patches is None else dict(patches))


def calibrate(experts: Mapping[str, nn.Module], run: Callable[[], None], config: CalibConfig = CalibConfig(),
              calibration: Mapping | None = None) -> PTQState:
    """Observe every expert's main layers while `run()` drives them, then build the state."""
    with contextlib.ExitStack() as stack:
        observed = {name: stack.enter_context(observe(model, config=config)) for name, model in experts.items()}
        with torch.no_grad():
            run()
    return build_state({name: ExpertObservation(model, observed[name]) for name, model in experts.items()},
                       config, calibration)
