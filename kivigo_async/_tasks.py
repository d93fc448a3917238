"""Telling apart why a ``CancelledError`` arrived."""

from __future__ import annotations

import asyncio
import sys

__all__ = ["cancel_requested"]


def cancel_requested() -> bool | None:
    """Whether the running task itself has been asked to cancel.

    ``None`` before Python 3.11, which cannot tell: a ``CancelledError`` may then
    come from the task's own cancellation or from a future it awaited being
    cancelled by someone else.
    """
    if sys.version_info >= (3, 11):
        task = asyncio.current_task()
        return task is not None and task.cancelling() > 0
    return None
