"""A ComfyUI MODEL as hifloat4.export's source, for 'Save HiF4 Model': the weights
the patcher would run (LoRA merged), in real values, with a progress bar and cancel.

ComfyUI facts relied on (see weights): the original weights live in the shared
`backup` while a clone is patched in; scale tensors of fp8 formats sit beside the
weight (`scale_weight`, `weight_scale`, ..., `comfy_quant`) and are dropped once the
weight is dequantized; 0.3.64 stores fp8 biases too, but a scale belongs to its
layer's weight only.
"""
from __future__ import annotations

import torch

import comfy.utils

from hifloat4 import export as hexport
from hifloat4 import plan as hplan
from hifloat4 import wan as hwan

from .progress import check_interrupt
from .weights import (EXACT_STORAGE, ROOT, dequantize, effective_weight, is_quantized_tensor, other_patches,
                      stored_tensor, wan_root, with_other_patches)

SCALE_SUFFIXES = (".scale_weight", ".scale_input", ".weight_scale", ".weight_scale_2", ".input_scale",
                  ".comfy_quant", ".pre_quant_scale")


class ComfyModelSource(hexport.ModelSource):
    """hifloat4.export's view of a ComfyUI MODEL: original weights (ComfyUI's shared
    backup when a clone is patched in), each with this patcher's own patches merged
    (LoRA etc.); weights stored in other units (fp8, scaled fp8, comfy_quant) are
    dequantized and carried as float32 (exact), their scale tensors dropped."""

    def __init__(self, model):
        self.model = model
        self.root = wan_root(model)
        self.name = f"ComfyUI MODEL ({type(self.root).__name__})"
        self.modules = dict(self.root.named_modules())
        params = dict(self.root.named_parameters()) | dict(self.root.named_buffers())
        self.params = {k: v for k, v in params.items() if not k.endswith(SCALE_SUFFIXES)}

    def _module(self, key: str):
        return self.modules.get(key.rpartition(".")[0])

    def _converted(self, key: str) -> bool:
        """Stored in units other than its real values."""
        t = self.params[key]
        return is_quantized_tensor(t) or t.dtype not in EXACT_STORAGE or (
            key.endswith(".weight") and hasattr(self._module(key), "scale_weight"))

    def shapes(self):
        return {k: tuple(v.shape) for k, v in self.params.items()}

    def stored_dtype(self, key):
        # fp8 * a float32 scale needs more than bf16's 8 significant bits: keep it exact
        return torch.float32 if self._converted(key) else self.params[key].dtype

    def tensor(self, key):
        t = stored_tensor(self.model, ROOT + key, self.params[key])
        if not other_patches(self.model, ROOT + key) and not self._converted(key):
            return t.to("cpu")
        with torch.no_grad():
            m = self._module(key)  # a layer's scale belongs to its weight only (0.3.64 stores its bias in fp8 too)
            w = dequantize(m, t) if key.endswith(".weight") and m is not None else t.to(torch.float32, copy=True)
            w = with_other_patches(self.model, ROOT + key, w)
        return w.to("cpu", self.stored_dtype(key))

    def real_weight(self, layer):
        with torch.no_grad():
            return effective_weight(self.model, layer, self.modules[layer]).to("cpu")

    def weight_dtype(self):
        main = [m for n, m in self.modules.items() if n.startswith("blocks.") and hwan.is_linear(m)]
        dtype = main[0].weight.dtype if main and not is_quantized_tensor(main[0].weight) else torch.bfloat16
        return dtype if dtype in EXACT_STORAGE else torch.bfloat16


def export_packed(model, config: hplan.W4A4Config, path: str) -> hexport.ExportReport:
    """Write `model` (unquantized, LoRAs merged) as a packed HiF4 checkpoint, with a
    progress bar; Cancel stops it and leaves no file."""
    bar = comfy.utils.ProgressBar(1)
    return hexport.export_expert(ComfyModelSource(model), config, path,
                                 progress=lambda done, total: bar.update_absolute(done, total),
                                 cancel=check_interrupt)
