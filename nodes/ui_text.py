"""Messages a user must see in the browser, not only in the server log: the file a
node wrote, a warning about its inputs.

ComfyUI's frontend shows a node's "ui" output only for node types it knows (images,
PreviewAny's text), but it draws every progress-text message under the node that
sent it, on any node type (frontend 1.27 and current). The "ui" text is kept as well:
it is what /history and API clients read.
"""
from __future__ import annotations

import logging

log = logging.getLogger("hifloat4")


def tell(text: str, level: int = logging.INFO) -> dict:
    """Log `text` as one line, show it on the executing node, and return the "ui"
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
