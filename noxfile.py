"""Development sessions: ``tests``, ``lint``, ``demo``, ``docs``, ``soak``, ``compat``, ``bench``,
``instructions``.

Each session builds its own virtual environment from the package registry, so
a fresh machine needs only Python and ``pip install nox``.
"""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True


@nox.session
def tests(session: nox.Session) -> None:
    """Run the whole test suite against real servers the suite starts itself."""
    session.install("-e", ".[test]")
    # pytest exits 5 when it collects nothing; nox fails on every non-zero code.
    # The soak test has a session of its own. Two worker processes, each starting its
    # own servers: most tests wait on servers (failovers, timeouts) rather than on
    # the CPU, so two halve the run on a 2-core machine. One process when the tests
    # are given a server of their own (both would flush its database); `-- -n 0` too.
    session.run("pytest", "-m", "not soak", "-n", _workers(), "--dist", "loadfile", *session.posargs)


def _workers() -> str:
    """Two pytest worker processes; one when the tests share a server someone else runs."""
    return "0" if os.environ.get("KIVIGO_TEST_REDIS_URL") else "2"


@nox.session
def lint(session: nox.Session) -> None:
    """ruff (lint and format) and mypy --strict."""
    session.install("-e", ".[lint]")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("mypy")


@nox.session
def demo(session: nox.Session) -> None:
    """Run the examples against an embedded Valkey (or KIVIGO_REDIS_URL)."""
    session.install("-e", ".[embedded]")
    session.run("python", "examples/run_all.py", *session.posargs)


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation site into site/; any warning fails the build."""
    session.install("-e", ".[docs]")
    session.run(
        "mkdocs",
        "build",
        "--strict",
        *session.posargs,
        # Material prints a banner about a future MkDocs major version on every build.
        env={"NO_MKDOCS_2_WARNING": "1"},
    )


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmark kivigo-async against raw redis-py and its peers; see benchmarks/README.md.

    ``nox -s bench -- --quick`` checks the harness in seconds.
    """
    session.install("-e", ".[bench]")
    session.run("python", "benchmarks/run.py", *session.posargs)


@nox.session
def instructions(session: nox.Session) -> None:
    """Client CPU per call in counted instructions (needs valgrind); see benchmarks/README.md."""
    session.install("-e", ".[bench]")
    session.run("python", "benchmarks/instructions.py", *session.posargs)


@nox.session
def soak(session: nox.Session) -> None:
    """About a minute of mixed load on both Redis transports; fails if connections, tasks or memory grow.

    ``KIVIGO_SOAK_SECONDS`` and ``KIVIGO_SOAK_OPS`` change its bounds.
    """
    session.install("-e", ".[test]")
    session.run("pytest", "tests/test_soak.py", "-m", "soak", *session.posargs)


#: Tests of the client layer, whose behaviour moves with asyncio and typing between
#: Python versions (cancellation, task groups, annotations), for the compat session.
COMPAT_TESTS = [
    "tests/test_client.py",
    "tests/test_codecs.py",
    "tests/test_get_or_set.py",
    "tests/test_hooks.py",
    "tests/test_health.py",
    "tests/test_conformance_memory.py",
    "tests/test_options_parsing.py",
    "tests/test_autopipeline.py",
]


@nox.session(python=["3.10", "3.13"])
def compat(session: nox.Session) -> None:
    """The client-layer tests on the oldest and the newest supported Python."""
    session.install("-e", ".[test]")
    session.run("pytest", "-n", _workers(), "--dist", "loadfile", *COMPAT_TESTS, *session.posargs)
