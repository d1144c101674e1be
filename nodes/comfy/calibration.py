"""Calibration through ComfyUI's own sampler: observers on every main Linear of a
throwaway clone, and KSampler(Advanced)'s sampling with our step callback.

ComfyUI facts relied on: object patches on `<layer>.forward` (removed again by
`unpatch_model`); a DIFFUSION_MODEL wrapper sees `transformer_options` with the
current `sigmas` and `cond_or_uncond` (how many cond/uncond chunks one call batches:
ComfyUI splits them when memory is short); `comfy.sample.sample` and
`comfy.samplers.KSampler` as nodes.common_ksampler uses them; the sampler and
scheduler names KSampler offers; a CLIP's `encode_from_tokens_scheduled`.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

import comfy.patcher_extension
import comfy.sample
import comfy.samplers

from hifloat4 import calibrate as hcalibrate
from hifloat4 import wan as hwan

from .weights import PLUGIN_KEY, LayerCall, effective_weight, forward_key, linear_modules, model_fingerprint, wan_root


def sampler_names() -> list[str]:
    return comfy.samplers.KSampler.SAMPLERS


def scheduler_names() -> list[str]:
    return comfy.samplers.KSampler.SCHEDULERS


class Observer(LayerCall):
    """`<layer>.forward` during calibration: folds the input into the layer's
    hifloat4.calibrate.LayerObservation (statistics and token sample; one update per
    forward call, cond and uncond batched as the sampler batched them), then runs the
    layer unchanged."""

    def __init__(self, module: nn.Module, session: "CalibrationSession"):
        super().__init__(module)
        self.session = session
        self.observation = None

    def __call__(self, x, *args, **kwargs):
        s = self.session
        if s.active:
            if self.observation is None:
                self.observation = hcalibrate.LayerObservation(x.shape[-1], s.config, device=x.device)
            with torch.no_grad():
                self.observation.update(x)
        return self.run_original(x, *args, **kwargs)


class CalibrationSession:
    """A throwaway clone of one expert with observers on its main layers. Use as a
    context manager: observers are switched off and removed on exit, error or not."""

    def __init__(self, model, config: hcalibrate.CalibConfig):
        self.model = model
        self.config = config
        self.active = True
        self.sigmas: list[Tensor] = []
        self.chunk_counts: dict[int, int] = {}
        self.names = hwan.main_linear_names(wan_root(model))
        modules = linear_modules(model, self.names)
        self.clone = model.clone()
        self.observers = {n: Observer(modules[n], self) for n in self.names}
        for n, obs in self.observers.items():
            self.clone.add_object_patch(forward_key(n), obs)
        self.clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, PLUGIN_KEY,
                                        self._diffusion_wrapper)

    def _diffusion_wrapper(self, executor, x, timestep, context, clip_fea, time_dim_concat,
                           transformer_options, *args, **kwargs):
        """Tags each call with its sigma and the number of cond/uncond chunks batched
        into it (ComfyUI splits them when memory is short; reported in the state)."""
        if self.active:
            chunks = len(transformer_options.get("cond_or_uncond") or [0])
            self.chunk_counts[chunks] = self.chunk_counts.get(chunks, 0) + 1
            if "sigmas" in transformer_options:
                self.sigmas.append(transformer_options["sigmas"].detach().reshape(-1)[:1])
        return executor(x, timestep, context, clip_fea, time_dim_concat, transformer_options, *args, **kwargs)

    def calls(self) -> dict[str, int]:
        """Model calls, and how many of them batched more than one cond/uncond chunk."""
        return {"forward": sum(self.chunk_counts.values()),
                "batched": sum(n for c, n in self.chunk_counts.items() if c > 1)}

    def sigma_range(self) -> list[float] | None:
        if not self.sigmas:
            return None
        s = torch.cat(self.sigmas).float().cpu()
        return [float(s.min()), float(s.max())]

    def observation(self) -> hcalibrate.ExpertObservation:
        """What hifloat4.calibrate.build_state needs: the observations, the real-valued
        weights (LoRA merged, fp8 dequantized) and the unpatched model's fingerprint."""
        missing = [n for n, o in self.observers.items() if o.observation is None]
        if missing:
            raise RuntimeError(f"calibration saw no input for {len(missing)} layers (e.g. {missing[0]}); "
                               "did this expert run at least one step?")
        modules = linear_modules(self.model, self.names)
        return hcalibrate.ExpertObservation(
            model=wan_root(self.model), layers={n: o.observation for n, o in self.observers.items()},
            weight=lambda name: effective_weight(self.model, name, modules[name]),
            fingerprint=model_fingerprint(self.model))

    def close(self) -> None:
        self.active = False
        modules = [o._module() for o in self.observers.values()]
        if any(m is not None and isinstance(m.__dict__.get("forward"), Observer) for m in modules):
            # restores every object patch of this clone; each sampling re-applies its own
            self.clone.unpatch_model(device_to=None, unpatch_weights=False)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def schedule_sigmas(model, steps: int, sampler_name: str, scheduler: str) -> list[float]:
    """The sigma schedule KSampler(Advanced) would use for this model."""
    ks = comfy.samplers.KSampler(model, steps=steps, device="cpu", sampler=sampler_name, scheduler=scheduler)
    return [float(s) for s in ks.sigmas]


def sample_segment(model, latent: dict, seed: int, steps: int, cfg: float, sampler_name: str,
                   scheduler: str, positive, negative, start_step: int | None, last_step: int | None,
                   add_noise: bool, force_full_denoise: bool, on_step: Callable[[int], None]) -> dict:
    """KSamplerAdvanced's sampling (nodes.common_ksampler) with our own step callback."""
    latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    if add_noise:
        noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    else:
        noise = torch.zeros(latent_image.size(), dtype=latent_image.dtype, layout=latent_image.layout,
                            device="cpu")
    samples = comfy.sample.sample(
        model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
        denoise=1.0, disable_noise=not add_noise, start_step=start_step, last_step=last_step,
        force_full_denoise=force_full_denoise, noise_mask=latent.get("noise_mask"),
        callback=lambda step, x0, x, total: on_step(step + 1), disable_pbar=True, seed=seed)
    out = latent.copy()
    out["samples"] = samples
    return out


def encode_prompt(clip, text: str):
    """CLIPTextEncode."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))
