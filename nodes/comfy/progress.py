"""Progress, cancel and messages a user must see: comfy.utils.ProgressBar (whose
updates also let the server raise on a cancel), comfy.model_management's interrupt
flag, and progress text drawn under the executing node."""
from __future__ import annotations

import logging

import comfy.model_management
import comfy.utils

log = logging.getLogger("hifloat4")


class Progress:
    """One ProgressBar over the whole calibration; every update also lets the
    server raise on a cancel. Each sampling segment also says what it is doing, under
    the node and in the log: "calibrating prompt 2 of 4: high_noise expert, steps 1-10 of 20"."""

    def __init__(self, total: int):
        self.bar = comfy.utils.ProgressBar(total)
        self.base = 0
        self.prompt = "prompt 1 of 1"

    def stage(self, expert: str, first: int, last: int, steps: int) -> str:
        """Announce the segment that samples steps first+1..last with `expert`; returns the text."""
        text = f"calibrating {self.prompt}: {expert} expert, steps {first + 1}-{last} of {steps}"
        tell(text)
        return text

    def step(self, done_in_segment: int) -> None:
        self.bar.update_absolute(self.base + done_in_segment)

    def advance(self, n: int) -> None:
        self.base += n
        self.bar.update_absolute(self.base)


def check_interrupt() -> None:
    comfy.model_management.throw_exception_if_processing_interrupted()


def tell(text: str, level: int = logging.INFO) -> dict:
    """Messages a user must see in the browser, not only in the server log. ComfyUI's
    frontend shows a node's "ui" output only for node types it knows, but draws every
    progress-text message under the node that sent it (frontend 1.27 and current).

    Log `text` as one line, show it on the executing node, and return the "ui"
    entry ({"text": [text]}) for the node's return value."""
    log.log(level, "HiF4: %s", text)
    try:
        from comfy_execution.utils import get_executing_context
        from server import PromptServer
    except ImportError:  # ComfyUI without progress text (or not running): the log line remains
        return {"text": [text]}
    context, server = get_executing_context(), getattr(PromptServer, "instance", None)
    if context is not None and server is not None:
        server.send_progress_text(text, context.node_id, server.client_id)
    return {"text": [text]}
