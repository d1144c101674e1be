"""The LoRA file names and strengths upstream of a node's MODEL input, read from the
queued prompt (the PROMPT hidden input), so a PTQ state can name the LoRAs it was
calibrated with: a MODEL itself does not carry them (see patch_record).

ComfyUI facts relied on (0.3.64 and 0.33): PROMPT is the API prompt as queued,
{node id: {"class_type": str, "inputs": {name: literal value | [source id, output
index]}}}, and UNIQUE_ID is the calling node's id in it; LoraLoaderModelOnly and
LoraLoader take `model`, `lora_name` and `strength_model`, and add the LoRA's patches
at strength_model; model pass-through nodes (ModelSamplingSD3, TorchCompileModel, ...)
take their MODEL as `model`.

Best effort by design: anything not found (a strength or name fed by a link, a custom
loader with other input names, no PROMPT, a malformed or cyclic graph) gives fewer
names, never an error. No ComfyUI import: a pure function of the prompt dict.
"""
from __future__ import annotations

from collections.abc import Mapping

LOADERS = {"LoraLoaderModelOnly", "LoraLoader"}


def _link(value) -> str | None:
    """The source node id of a link input ([id, output index]), else None."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[1], int):
        return str(value[0]) if isinstance(value[0], (str, int)) and not isinstance(value[0], bool) else None
    return None


def _inputs(node) -> Mapping:
    """A prompt node's inputs; {} for anything that is not a node."""
    inputs = node.get("inputs") if isinstance(node, Mapping) else None
    return inputs if isinstance(inputs, Mapping) else {}


def _literal_lora(node: Mapping, inputs: Mapping) -> tuple[float, str] | None:
    """(strength_model, lora_name) of a LoRA loader node whose two are widget values."""
    if node.get("class_type") not in LOADERS and not {"lora_name", "strength_model"} <= inputs.keys():
        return None
    name, strength = inputs.get("lora_name"), inputs.get("strength_model")
    if isinstance(name, str) and isinstance(strength, (int, float)) and not isinstance(strength, bool):
        return float(strength), name
    return None


def loras_upstream(prompt, node_id, input_name: str) -> dict[float, list[str]]:
    """strength -> LoRA file names (in load order) of the LoRA loaders on the MODEL
    chain feeding `input_name` of node `node_id`: from that input, each node's `model`
    link is followed until a node has none (the model loader)."""
    if not isinstance(prompt, Mapping):
        return {}
    found: list[tuple[float, str]] = []
    seen: set[str] = set()
    inputs = _inputs(prompt.get(str(node_id)))
    source = _link(inputs.get(input_name))
    while source is not None and source not in seen:
        seen.add(source)
        node = prompt.get(source)
        inputs = _inputs(node)
        lora = _literal_lora(node, inputs) if inputs else None
        if lora is not None:
            found.append(lora)
        source = _link(inputs.get("model"))
    names: dict[float, list[str]] = {}
    for strength, name in reversed(found):
        names.setdefault(strength, []).append(name)
    return names
