"""Where the callback sits among the Trainer's callbacks.

W&B (and every ``report_to`` integration) writes its row in its own ``on_log``; our keys reach
the row that holds ``train/loss`` only if our ``on_log`` runs first.  The Trainer appends user
callbacks after the integrations, so the callback moves itself before the first reporter.
"""

from __future__ import annotations

import sys

from transformers.trainer_callback import CallbackHandler

__all__ = ["find_callback_handler", "place_before_reporters", "reporter_types"]


def find_callback_handler() -> CallbackHandler | None:
    """The CallbackHandler that is calling the hook that called us (its ``self``)."""
    frame = sys._getframe(2)
    for _ in range(6):
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, CallbackHandler):
            return candidate
        frame = frame.f_back
    return None


def reporter_types() -> tuple[type, ...]:
    try:
        from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK
    except ImportError:  # pragma: no cover
        return ()
    return tuple(INTEGRATION_TO_CALLBACK.values())


def place_before_reporters(callback, handler: CallbackHandler | None) -> bool | None:
    """Move ``callback`` before the first reporting integration in ``handler``; return whether no
    reporter runs before it (``None`` when the handler was not found)."""
    if handler is None or callback not in handler.callbacks:
        return None
    cbs = handler.callbacks
    reporters = reporter_types()
    first = next((i for i, cb in enumerate(cbs) if isinstance(cb, reporters)), None)
    me = cbs.index(callback)
    if first is not None and first < me:
        cbs.remove(callback)  # moving backwards keeps call_event's iteration intact
        cbs.insert(first, callback)
        me = first
    return not any(isinstance(cb, reporters) for cb in cbs[:me])
