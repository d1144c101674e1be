"""Prototype: packed HiF4 weights as a comfy_kitchen layout on current ComfyUI (issue 20,
part 3). Kept as a probe, not wired into the plugin (docs/native_comfyui_layout.md says
why); tests/comfy/test_layout_probe.py checks the document's claims with it, and

    COMFYUI_DIR=... $COMFY_VENV/bin/python tests/comfy/layout_probe.py

prints the measurements (load time, forward time, memory, lines) of the layout path
against the plugin's own ops (nodes/comfy/packed_ops.py).

What a plugin can register (feature-detected: comfy.quant_ops.register_layout_op exists
and comfy_kitchen imported, as on 0.33.0; 0.3.64 has neither): a QuantizedLayout class, its aten ops, and a
QUANT_ALGOS entry (a module dict). What it cannot: core's per-format loader
(comfy/ops.py _load_quantized_module, a closed if/elif chain raising "Unsupported
quantization format"), so the Linear that builds the QuantizedTensor is ours: core's
MixedPrecisionOps.Linear with our _load_from_state_dict, loaded by the plugin's loader.

The layout: qdata = the planar codes of Q(rot(W / m)) (hifloat4.layout.to_planar),
the mask m and the rotation are layout parameters, so `dequantize` returns the real W
(decode, rotation undone, * m) and `quantize` of a real W packs Q(rot(W / m)): core's
LoRA merge (convert_weight -> calculate_weight -> set_weight -> requantize_from_float)
then merges in the real basis. The linear op runs hifloat4.linear.w4a4_linear_packed,
the packed ops' own forward.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

if __name__ == "__main__":  # ComfyUI on the path and on the CPU before comfy is imported
    import os
    import sys

    sys.path[:0] = [os.environ["COMFYUI_DIR"], os.path.join(os.path.dirname(__file__), "..", "..")]
    from comfy.cli_args import args
    args.cpu = True

import comfy.ops

try:
    import comfy.quant_ops as cq
except ImportError:  # ComfyUI 0.3.64: no quantization layouts
    cq = None

from hifloat4 import linear as hlinear
from hifloat4 import packed_linear as hpacked
from hifloat4.rotation import Rotation, _fwht_, _scaled_signs

LAYOUT = "HiF4PackedLayout"
FORMAT = "hif4_packed"
AVAILABLE = cq is not None and hasattr(cq, "register_layout_op") and getattr(cq, "_CK_AVAILABLE", False)


def unrotate(v: Tensor, rot: Rotation) -> Tensor:
    """R^-1 along the last dim (fp32): R = H diag(s) / sqrt(b) blockwise is orthonormal,
    so R^-1 = diag(s) H / sqrt(b) (H symmetric)."""
    k = v.shape[-1]
    y = v.float().reshape(-1, rot.block).clone()
    y = _fwht_(y, torch.empty_like(y)).reshape(-1, k)
    return y * _scaled_signs(rot, k, v.device, torch.float32)


if AVAILABLE:
    class HiF4PackedLayout(cq.QuantizedLayout):
        """Packed HiF4 weight (planar rows) with the channel mask and rotation as parameters."""

        QUANTIZES_INPUT = False

        @dataclass(frozen=True)
        class Params(cq.ck.tensor.BaseLayoutParams):
            mask: Tensor | None = None  # (in,) float32
            rotation: Rotation | None = None
            compute: str = "auto"  # hifloat4.linear.resolve_compute's choice
            transposed: bool = False  # a logical W^T (aten.t), as F.linear decomposes outside inference mode

            def _tensor_fields(self) -> list[str]:
                return ["scale", "mask"]

        @classmethod
        def quantize(cls, tensor: Tensor, mask: Tensor | None = None, rotation: Rotation | None = None,
                     compute: str = "auto", **_ignored) -> tuple[Tensor, Params]:
            """Pack Q(rot(W / m)); core's scale="recalculate" / stochastic_rounding do not apply."""
            if mask is None:
                raise ValueError("HiF4PackedLayout.quantize needs the layer's channel mask")
            planar = hpacked.planar_weight(tensor.detach(), mask, rotation)
            params = cls.Params(scale=torch.ones((), device=tensor.device), orig_dtype=tensor.dtype,
                                orig_shape=tuple(tensor.shape), mask=mask.to(tensor.device, torch.float32),
                                rotation=rotation, compute=compute)
            return planar, params

        @classmethod
        def dequantize(cls, qdata: Tensor, params: Params) -> Tensor:
            """The real W: decode, undo the rotation, multiply by the mask."""
            v = hpacked.decode_weight(qdata, _in_features(params), torch.float32)
            if params.rotation is not None:
                v = unrotate(v, params.rotation)
            return (v * params.mask.to(v.device)).to(params.orig_dtype)

        @classmethod
        def get_plain_tensors(cls, qtensor) -> tuple[Tensor, Tensor]:
            return qtensor._qdata, qtensor._params.mask

        @classmethod
        def state_dict_tensors(cls, qdata: Tensor, params: Params) -> dict[str, Tensor]:
            return {"": qdata, "_hif4_mask": params.mask}

        @classmethod
        def requantize_kwargs(cls, qtensor) -> dict:
            p = qtensor._params
            return {"mask": p.mask, "rotation": p.rotation, "compute": p.compute}

    def _in_features(p) -> int:
        return p.orig_shape[0] if p.transposed else p.orig_shape[1]

    def _w4a4(x: Tensor, w, bias: Tensor | None) -> Tensor:
        """x @ W^T + b as the packed ops compute it (w: the (out, in) weight's QuantizedTensor)."""
        if isinstance(x, cq.QuantizedTensor):
            x = x.dequantize()
        p = w._params
        quant = hlinear.LayerQuant(p.mask.to(x.device), p.rotation)
        with torch.no_grad():
            return hlinear.w4a4_linear_packed(x.detach(), w._qdata.to(x.device), _in_features(p), bias, quant,
                                              p.compute)

    def _linear(qt, args, kwargs):
        """aten.linear (what F.linear dispatches under inference mode, as ComfyUI samples)."""
        x, w = args[0], args[1]
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        if not isinstance(w, cq.QuantizedTensor) or w._params.transposed:
            return torch.nn.functional.linear(*cq.ck.tensor.dequantize_args((x, w, bias)))
        return _w4a4(x, w, bias)

    def _t(qt, args, kwargs):
        """W^T, logically: F.linear decomposes into t + mm/addmm when autograd is on."""
        p = args[0]._params
        return cq.QuantizedTensor(args[0]._qdata, LAYOUT, dataclasses.replace(
            p, orig_shape=(p.orig_shape[1], p.orig_shape[0]), transposed=not p.transposed))

    def _mm(qt, args, kwargs):
        *bias, x, wt = args
        if not (isinstance(wt, cq.QuantizedTensor) and wt._params.transposed):
            return qt._dequant_and_fallback(torch.ops.aten.addmm.default if bias else torch.ops.aten.mm.default,
                                            args, kwargs)
        return _w4a4(x, _t(None, (wt,), {}), bias[0] if bias else None)

    def register() -> None:
        """What the plugin can register: the layout class, its linear op and a QUANT_ALGOS
        entry (read by MixedPrecisionOps.forward: the input is not quantized by core)."""
        cq.register_layout_class(LAYOUT, HiF4PackedLayout)
        cq.register_layout_op(torch.ops.aten.linear.default, HiF4PackedLayout)(_linear)
        cq.register_layout_op(torch.ops.aten.t.default, HiF4PackedLayout)(_t)
        cq.register_layout_op(torch.ops.aten.mm.default, HiF4PackedLayout)(_mm)
        cq.register_layout_op(torch.ops.aten.addmm.default, HiF4PackedLayout)(_mm)
        cq.QUANT_ALGOS[FORMAT] = {"storage_t": torch.uint8, "parameters": set(), "comfy_tensor_layout": LAYOUT,
                                  "quantize_input": False}

    _CARRIED = "hif4_packed_layer"  # nodes/comfy/packed_ops.py's placeholder attribute

    def layout_ops(compute_dtype: torch.dtype | None = None) -> type:
        """Core's MixedPrecisionOps whose Linear builds a HiF4 QuantizedTensor from the plugin
        loader's placeholders (core's loader cannot: its format chain is closed)."""
        base = comfy.ops.mixed_precision_ops({}, compute_dtype)

        class HiF4LayoutOps(base):
            class Linear(base.Linear):
                def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs):
                    layer = getattr(state_dict.get(prefix + "weight"), _CARRIED, None)
                    if layer is None:
                        return super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                                             missing_keys, unexpected_keys, error_msgs)
                    from hifloat4.layout import to_planar
                    dtype = self.factory_kwargs["dtype"] or state_dict[prefix + "weight"].dtype
                    params = HiF4PackedLayout.Params(
                        scale=torch.ones(()), orig_dtype=dtype, orig_shape=(self.out_features, self.in_features),
                        mask=layer.hif4_mask.to(torch.float32), rotation=layer.rotation)
                    self.quant_format, self.layout_type = FORMAT, LAYOUT
                    self.weight = torch.nn.Parameter(cq.QuantizedTensor(to_planar(layer.weight.data), LAYOUT, params),
                                                     requires_grad=False)
                    if self.bias is not None:
                        with torch.no_grad():
                            self.bias = torch.nn.Parameter(state_dict[prefix + "bias"].to(dtype), requires_grad=False)

        return HiF4LayoutOps

    def load_layout_model(path: str, placeholder, dtype: torch.dtype | None = None, compute: str = "auto"):
        """A MODEL from a packed HiF4 file, its packed Linears holding HiF4 QuantizedTensors:
        the plugin's loader (packed_loader.model_from_checkpoint, whose `placeholder`
        (packed_ops.placeholder) is passed in) with the layout ops; `dtype`: the
        high-precision weights' (None: the file's)."""
        import comfy.sd

        from hifloat4 import checkpoint as hckpt

        ckpt = hckpt.load_hif4_checkpoint(path)
        sd = dict(ckpt.tensors)
        for name, layer in ckpt.layers.items():
            sd[hckpt.codes_key(name)] = placeholder(layer, ckpt.weight_dtype)
        model = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"custom_operations": layout_ops(dtype)})
        for m in model.model.diffusion_model.modules():
            w = getattr(m, "weight", None)
            if isinstance(w, cq.QuantizedTensor):
                w._params = dataclasses.replace(w._params, compute=compute)
        return model


def count_lines(path: str, stop: str | None = None) -> int:
    """Non-blank, non-comment lines of a file (docstrings included), up to a line starting
    with `stop`."""
    n = 0
    with open(path) as f:
        for line in f:
            if stop is not None and line.startswith(stop):
                break
            n += bool(line.strip()) and not line.strip().startswith("#")
    return n


def export_tiny(directory, rotation: Rotation | None = None):
    """The harness's tiny t2v high-noise expert calibrated (optionally rotated) and exported
    with `python -m hifloat4 export`: the packed file's path."""
    import os
    import pathlib

    from safetensors.torch import load_file

    from hifloat4 import export as hexp
    from hifloat4 import state as hstate
    from hifloat4.calibrate import CalibConfig, calibrate
    from hifloat4.tools.tiny_wan import example_inputs
    from hifloat4.wan_model import WanConfig, WanModel

    src = pathlib.Path(os.environ["COMFY_HARNESS_MODELS"]) / "diffusion_models" / "tiny_wan2.2_t2v_high_noise.safetensors"
    model = WanModel(WanConfig()).eval().requires_grad_(False)
    model.load_state_dict(load_file(str(src)))
    x, t, ctx = example_inputs(model, text_len=24)
    state = calibrate({"high_noise": model}, lambda: model(x, t, ctx), CalibConfig(rotation=rotation))
    hstate.save_state(directory / "state.safetensors", state)
    out = directory / "packed.safetensors"
    if hexp.main(["--model", str(src), "--state", str(directory / "state.safetensors"), "--out", str(out)]) != 0:
        raise RuntimeError("export failed")
    return out


def measure(packed_path: str, packed_loader, packed_ops, rounds: int = 15) -> dict:
    """Load time, forward time (apply_model of the tiny expert on the CPU, both models
    loaded; the two paths alternate each round, so shared-CPU noise hits both) and resident
    bytes (ModelPatcher.model_size: a QuantizedTensor counts its qdata only) of the plugin's
    ops (the plugin's `packed_loader` module) and the layout path, on the same file;
    medians in ms."""
    import statistics
    import time

    import comfy.model_management as mm

    dtype = packed_loader.load_packed_model(packed_path).model.get_dtype()  # what ComfyUI picked (fp32 on CPU)
    loaders = {"plugin_ops": packed_loader.load_packed_model,
               "layout": lambda path: load_layout_model(path, packed_ops.placeholder, dtype)}
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 16, 2, 8, 8, generator=g), torch.tensor([0.9, 0.6])
    ctx = torch.randn(2, 24, 4096, generator=g) * 0.2
    times = {name: {"load_ms": [], "forward_ms": []} for name in loaders}
    for _ in range(rounds):
        for name, load in loaders.items():
            t0 = time.perf_counter()
            load(packed_path)
            times[name]["load_ms"].append(1000 * (time.perf_counter() - t0))
    patchers = {name: load(packed_path) for name, load in loaders.items()}
    mm.load_models_gpu(list(patchers.values()))
    outputs = {}
    with torch.inference_mode():
        for name, p in patchers.items():
            outputs[name] = p.model.apply_model(x, t, c_crossattn=ctx)  # warm
        for _ in range(rounds):
            for name, p in patchers.items():
                t0 = time.perf_counter()
                p.model.apply_model(x, t, c_crossattn=ctx)
                times[name]["forward_ms"].append(1000 * (time.perf_counter() - t0))
    out = {name: {k: round(statistics.median(v), 1) for k, v in d.items()} |
           {"model_size_bytes": patchers[name].model_size()} for name, d in times.items()}
    mm.unload_all_models()
    out["bit_identical"] = torch.equal(outputs["plugin_ops"], outputs["layout"])
    return out


def _main() -> None:
    import importlib
    import importlib.util
    import json
    import pathlib
    import sys
    import tempfile

    repo = pathlib.Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("comfyui_hifloat4", repo / "__init__.py",
                                                  submodule_search_locations=[str(repo)])
    plugin = importlib.util.module_from_spec(spec)
    sys.modules["comfyui_hifloat4"] = plugin
    spec.loader.exec_module(plugin)  # as ComfyUI imports it
    packed_loader = importlib.import_module("comfyui_hifloat4.nodes.comfy.packed_loader")
    packed_ops = importlib.import_module("comfyui_hifloat4.nodes.comfy.packed_ops")
    if not AVAILABLE:
        sys.exit("this ComfyUI has no layout registry (comfy.quant_ops.register_layout_op): nothing to measure")
    register()
    with tempfile.TemporaryDirectory() as d:
        result = measure(str(export_tiny(pathlib.Path(d))), packed_loader, packed_ops)
    result["lines"] = {"nodes/comfy/packed_ops.py": count_lines(str(repo / "nodes/comfy/packed_ops.py")),
                       "layout prototype (this file up to count_lines)": count_lines(__file__, "def count_lines")}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    _main()
