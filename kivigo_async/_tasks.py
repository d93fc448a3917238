"""Telling apart why a ``CancelledError`` arrived; work that outlives its caller; naming callables."""

from __future__ import annotations

import asyncio
import functools
import sys
from collections.abc import Coroutine
from typing import Any

__all__ = ["callable_name", "cancel_requested", "detached"]


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


def detached(work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
    """A task for ``work`` that must finish even when its caller stops waiting for it.

    Awaited through ``asyncio.shield``: a caller that is cancelled leaves it
    running. Its error, if any, goes to whoever awaits it; when nobody does
    (the only caller gave up), it is not reported as never retrieved.
    """
    task = asyncio.get_running_loop().create_task(work, name=name)
    task.add_done_callback(_retrieve)
    return task


def _retrieve(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()


def callable_name(fn: object) -> str:
    """A callable's name for log lines and reprs: never its repr, which may hold arguments.

    A ``functools.partial`` is named after the function it wraps (its bound
    arguments, a token say, must not reach a log).
    """
    while isinstance(fn, functools.partial):
        fn = fn.func
    name = getattr(fn, "__qualname__", None)
    return name if isinstance(name, str) and name else type(fn).__qualname__
