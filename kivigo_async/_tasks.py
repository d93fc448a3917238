"""Telling apart why a ``CancelledError`` arrived; work that outlives its caller; naming callables."""

from __future__ import annotations

import asyncio
import functools
import sys
from collections.abc import Awaitable, Coroutine
from typing import Any, TypeVar

__all__ = ["awaited_apart", "callable_name", "cancel_and_wait", "cancel_requested", "detached"]

T = TypeVar("T")


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


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait until it has finished (its error, if any, is not reported)."""
    task.cancel()
    task.add_done_callback(_retrieve)
    await asyncio.wait({task})


async def awaited_apart(awaitable: Awaitable[T], timeout: float | None = None) -> asyncio.Task[T] | None:
    """Await ``awaitable`` in a task of its own, for at most ``timeout`` seconds.

    Returns the finished task, or None when the time ran out (the task is then
    cancelled, and waited for). When the caller is cancelled, so is the task.

    A returned task that ended cancelled was cancelled from inside: it awaited a
    future that something else cancelled. Awaited directly, that cancellation
    would reach the caller as its own, which before Python 3.11 cannot be told
    from a real one.
    """
    task = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    except BaseException:
        await cancel_and_wait(task)
        raise
    if not done:
        await cancel_and_wait(task)
        return None
    return task


def callable_name(fn: object) -> str:
    """A callable's name for log lines and reprs: never its repr, which may hold arguments.

    A ``functools.partial`` is named after the function it wraps (its bound
    arguments, a token say, must not reach a log).
    """
    while isinstance(fn, functools.partial):
        fn = fn.func
    name = getattr(fn, "__qualname__", None)
    return name if isinstance(name, str) and name else type(fn).__qualname__
