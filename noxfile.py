"""Development sessions: ``nox -s tests``, ``nox -s lint``, ``nox -s demo``.

Each session builds its own virtual environment from the package registry, so
a fresh machine needs only Python and ``pip install nox``.
"""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True


@nox.session
def tests(session: nox.Session) -> None:
    """Run the whole test suite against real servers the suite starts itself."""
    session.install("-e", ".[test]")
    # pytest exits 5 when it collects nothing; nox fails on every non-zero code.
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff and mypy --strict."""
    session.install("-e", ".[lint]")
    session.run("ruff", "check", ".")
    session.run("mypy")


@nox.session
def demo(session: nox.Session) -> None:
    """Run the examples against an embedded Valkey (or KIVIGO_REDIS_URL)."""
    session.install("-e", ".[embedded]")
    session.run("python", "examples/run_all.py", *session.posargs)
