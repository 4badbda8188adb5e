"""Warnings the user sees: a log line plus a `qwenpix.warning` websocket event that the web extension shows
as a toast on the node that was running (ComfyUI 0.3.75 has no warning channel of its own).

Used where something a user connected cannot be honoured but does not warrant stopping the prompt. Each
distinct message is sent once per prompt.
"""

from __future__ import annotations

import logging

EVENT = "qwenpix.warning"
_sent: set[tuple[str | None, str]] = set()  # (prompt id, message) already sent; the host seam's only state


def _context() -> tuple[str | None, str | None]:
    try:
        from comfy_execution.utils import get_executing_context
    except ImportError:  # an older or stripped-down host
        return None, None
    ctx = get_executing_context()
    return (ctx.prompt_id, ctx.node_id) if ctx is not None else (None, None)


def warn(message: str) -> None:
    """Log `message` and show it in the UI on the node being executed (once per prompt)."""
    prompt_id, node_id = _context()
    if (prompt_id, message) in _sent:
        return
    if len(_sent) > 1000:
        _sent.clear()
    _sent.add((prompt_id, message))
    logging.warning("QwenPix: %s", message)
    try:
        from server import PromptServer
    except ImportError:
        return
    server = getattr(PromptServer, "instance", None)
    if server is not None and getattr(server, "client_id", None) is not None:
        server.send_sync(EVENT, {"node": node_id, "prompt_id": prompt_id, "message": message}, server.client_id)
