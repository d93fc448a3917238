"""Redis Cluster and Sentinel topologies for tests, built from :class:`RedisServer` processes.

* :class:`RedisCluster`: 3 primaries + 3 replicas (by default), each a
  ``cluster-enabled`` :class:`~kivigo_async.testing.servers.RedisServer`, joined
  with ``valkey-cli`` / ``redis-cli --cluster create`` and waited for until every
  node reports ``cluster_state:ok`` and knows every other node.
* :class:`RedisSentinel`: 1 primary, 1 replica and 3 sentinels watching them
  under one service name, waited for until every sentinel sees the replica and
  the other sentinels.

Every process is a :class:`RedisServer`, so it is stopped by PID like any other
test server, and a node can be ``kill()``-ed and ``restart()``-ed on its port.

Both come in the variants of single servers (``plain``, ``password``, ``acl``,
``tls``). The data nodes of one topology share one password (replicas log in to
their primary with ``masterauth`` / ``masteruser``) or one test CA and
certificate (``tls-replication``, and ``tls-cluster`` for the cluster bus);
sentinels log in to what they watch with ``sentinel auth-pass`` /
``auth-user``, and in the ``password`` and ``acl`` variants require a password
of their own (``sentinel_password``). The topology objects expose what a client
needs: ``username``, ``password``, ``ca_path`` / ``ssl_context()``, and for
sentinels ``sentinel_username`` / ``sentinel_password``.

Example:
    ```python
    from kivigo_async.backends.redis import RedisClusterOptions
    from kivigo_async.testing.servers import find_binaries
    from kivigo_async.testing.topologies import RedisCluster, RedisSentinel

    binary = find_binaries()[0]
    with RedisCluster(binary) as cluster:
        print(cluster.addrs)                    # ["127.0.0.1:23001", ...]
        victim = cluster.primaries()[0]
        victim.kill()
        cluster.wait_ready(expected_nodes=5)    # a replica took over
    with RedisSentinel(binary) as topology:
        print(topology.sentinel_addrs, topology.master_addr())
        topology.failover()                     # SENTINEL FAILOVER, waits for the switch
    with RedisCluster(binary, variant="acl") as cluster:
        options = RedisClusterOptions(
            addrs=cluster.addrs, username=cluster.username, password=cluster.password
        )
    ```
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import secrets
import shutil
import ssl
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import redis

from .servers import (
    ACL_USER,
    HOST,
    VARIANTS,
    RedisServer,
    ServerBinary,
    ServerStartError,
    ServerUnavailable,
    TLSFiles,
    Variant,
    _tls_problem,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from types import TracebackType

__all__ = [
    "ClusterNodeInfo",
    "RedisCluster",
    "RedisSentinel",
    "find_cli",
    "wait_replicated",
]

_POLL: Final = 0.1
_CLI_TIMEOUT: Final = 120.0
_TOTAL_SLOTS: Final = 16384
# Node states during which a cluster is not settled yet.
_UNSETTLED_FLAGS: Final = frozenset({"fail", "fail?", "handshake", "noaddr"})
# A new replica waits 5 s by default before a diskless full sync starts; tests can't afford that.
_FAST_SYNC: Final[dict[str, str]] = {"repl-diskless-sync-delay": "0"}


@functools.cache
def _cli_has_tls(path: str) -> bool:
    # A build without TLS refuses the option ("Unrecognized option ... '--tls'").
    try:
        done = subprocess.run(
            [path, "--tls", "--version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def find_cli(binary: ServerBinary, *, tls: bool = False) -> str:
    """The ``valkey-cli`` / ``redis-cli`` for ``binary``: next to it first, then on ``PATH``.

    With ``tls``, only a cli built with TLS will do; when every one found lacks
    it, the :class:`ServerUnavailable` raised is ``optional`` (like a server
    built without TLS).
    """
    names = ("valkey-cli", "redis-cli") if binary.kind == "valkey" else ("redis-cli", "valkey-cli")
    folder = os.path.dirname(binary.path)
    candidates = [os.path.join(folder, name) for name in names]
    candidates += [found for name in names if (found := shutil.which(name))]
    usable = [c for c in candidates if os.path.isfile(c) and os.access(c, os.X_OK)]
    if not usable:
        raise ServerUnavailable(f"no {names[0]} next to {binary.path} or on PATH (needed to build a cluster)")
    if not tls:
        return usable[0]
    for candidate in usable:
        if _cli_has_tls(candidate):
            return candidate
    raise ServerUnavailable(
        f"no {' or '.join(names)} built with TLS next to {binary.path} or on PATH (needed for a TLS cluster)",
        optional=True,
    )


def _client(server: RedisServer, timeout: float = 2.0) -> redis.Redis:
    # The server's own credentials and CA: a sentinel's differ from its primary's.
    kwargs: dict[str, Any] = server.redis_kwargs()
    return redis.Redis(**kwargs, socket_timeout=timeout, socket_connect_timeout=timeout)


def _query(server: RedisServer, *args: str) -> object:
    with _client(server) as client:
        return client.execute_command(*args)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def wait_replicated(primary: RedisServer, timeout: float = 10.0) -> int:
    """Wait until every replica of ``primary`` has applied all it has written; return how many.

    ``WAIT`` on a new connection is no substitute: it waits only for that
    connection's own writes, so with none it returns at once, replicated or not.
    Here the primary's replication offset is read first, then each replica it
    lists is polled until it has applied that much. Raises ``TimeoutError``
    (naming the replica, never a credential) if one does not catch up in time.

    Example:
        ```python
        await client.set("k", 1)
        assert wait_replicated(cluster.node_for_slot(key_slot(b"k"))) == 1
        ```
    """
    deadline = time.monotonic() + timeout
    with _client(primary) as conn:
        info: dict[str, Any] = conn.info("replication")
    written = int(info["master_repl_offset"])
    # redis-py parses each "slaveN:ip=...,port=...,state=..." line into a dict.
    replicas = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)]
    for replica in replicas:
        host, port = str(replica["ip"]), int(replica["port"])
        where = f"{host}:{port}"
        # The data nodes of one topology share their credentials and CA.
        kwargs: dict[str, Any] = {**primary.redis_kwargs(), "host": host, "port": port}
        with redis.Redis(**kwargs, socket_timeout=0.5, socket_connect_timeout=0.5) as conn:
            while True:
                applied, linked = _replica_progress(conn)
                if linked and applied >= written:
                    break
                if time.monotonic() > deadline:
                    said = "did not answer" if applied < 0 else f"applied {applied} of {written} bytes"
                    raise TimeoutError(
                        f"replica {where} of {primary.host}:{primary.port} {said} within {timeout} s"
                    )
                time.sleep(0.01)
    return len(replicas)


def _replica_progress(conn: redis.Redis) -> tuple[int, bool]:
    """The replication offset a replica has applied (-1: no answer) and whether its link is up."""
    try:
        state: dict[str, Any] = conn.info("replication")
    except (redis.ConnectionError, redis.TimeoutError):
        return -1, False  # busy (loading, stopped): asked again until the deadline
    return int(state.get("master_repl_offset", -1)), state.get("master_link_status") == "up"


class _Security:
    """The password or TLS files shared by every data node of one topology."""

    def __init__(self, binary: ServerBinary, variant: Variant) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
        if variant == "tls" and (problem := _tls_problem(binary)) is not None:
            raise problem
        self.variant: Variant = variant
        self.password = secrets.token_hex(16) if variant in ("password", "acl") else None
        self.tls_files: TLSFiles | None = None
        self._dir: Path | None = None

    @property
    def username(self) -> str | None:
        return ACL_USER if self.variant == "acl" else None

    def start(self) -> None:
        if self.variant == "tls" and self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="kivigo-topology-tls-"))
            self.tls_files = TLSFiles.create(self._dir)

    def stop(self) -> None:
        directory, self._dir = self._dir, None
        self.tls_files = None
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)

    def server(self, binary: ServerBinary, config: Mapping[str, str]) -> RedisServer:
        """A data node: logs in to its primary (after a failover, any node may be a replica)."""
        extra = dict(config)
        if self.password is not None:
            extra["masterauth"] = self.password
            if self.variant == "acl":
                extra["masteruser"] = ACL_USER
        if self.variant == "tls":
            extra["tls-replication"] = "yes"
        return RedisServer(
            binary, self.variant, extra_config=extra, password=self.password, tls_files=self.tls_files
        )

    def ssl_context(self) -> ssl.SSLContext:
        if self.tls_files is None:
            raise ValueError(f"the {self.variant} variant does not use TLS (or is not started)")
        return self.tls_files.ssl_context()

    def cli_options(self) -> tuple[list[str], dict[str, str]]:
        """Arguments and environment that let ``*-cli`` reach the nodes."""
        args: list[str] = []
        env = dict(os.environ)
        env.pop("REDISCLI_AUTH", None)
        if self.password is not None:
            # Through the environment: argv is visible to every user in `ps`.
            env["REDISCLI_AUTH"] = self.password
            if self.variant == "acl":
                args += ["--user", ACL_USER]
        if self.tls_files is not None:
            files = self.tls_files
            args += ["--tls", "--cacert", files.ca_path, "--cert", files.cert_path, "--key", files.key_path]
        return args, env


class ClusterNodeInfo:
    """One line of ``CLUSTER NODES``, tied to our server process when we run it."""

    __slots__ = ("addr", "flags", "master_id", "node_id", "server", "slots")

    def __init__(self, line: str, servers: Mapping[str, RedisServer]) -> None:
        fields = line.split()
        self.node_id = fields[0]
        # "127.0.0.1:7000@17000[,hostname]": the client address is before '@'.
        self.addr = fields[1].split("@", 1)[0]
        self.flags = frozenset(fields[2].split(","))
        self.master_id = None if fields[3] == "-" else fields[3]
        self.slots = fields[8:]
        self.server = servers.get(self.addr)

    @property
    def is_primary(self) -> bool:
        return "master" in self.flags

    def __repr__(self) -> str:
        role = "primary" if self.is_primary else "replica"
        return f"<ClusterNodeInfo {self.addr} {role} {','.join(sorted(self.flags))}>"


class _SecuredTopology:
    """The credentials and CA a test needs to reach a topology, from its ``_Security``."""

    _security: _Security

    @property
    def variant(self) -> Variant:
        return self._security.variant

    @property
    def tls(self) -> bool:
        """Whether every process (data nodes, and sentinels if any) speaks TLS only."""
        return self._security.variant == "tls"

    @property
    def username(self) -> str | None:
        """The ACL user clients log in to the data nodes as (``acl`` variant), else ``None``."""
        return self._security.username

    @property
    def password(self) -> str | None:
        """The data nodes' password (``password`` / ``acl`` variants), else ``None``. Never in ``repr``."""
        return self._security.password

    @property
    def tls_files(self) -> TLSFiles | None:
        """The CA and certificate every process uses (``tls`` variant, once started)."""
        return self._security.tls_files

    @property
    def ca_path(self) -> str | None:
        files = self._security.tls_files
        return files.ca_path if files is not None else None

    def ssl_context(self) -> ssl.SSLContext:
        """A verifying client context that trusts the topology's CA (``tls`` variant)."""
        return self._security.ssl_context()


class RedisCluster(_SecuredTopology):
    """A Redis / Valkey cluster of ``primaries`` shards with ``replicas`` replicas each.

    ``node_timeout_ms`` is ``cluster-node-timeout``: how long a node may be
    unreachable before it is considered failed (and a replica promoted).
    Keep it small for failover tests and larger for a cluster shared by many
    tests on a busy machine, where a node stalled by load must not be failed over.

    ``variant`` is that of every node (see :class:`RedisServer`): ``password``
    and ``acl`` nodes share one password (replicas log in with ``masterauth``,
    and ``masteruser`` for ``acl``); ``tls`` nodes share one test CA and
    certificate and talk TLS on the cluster bus and for replication too.
    ``username``, ``password`` and ``ssl_context()`` give what a client needs.
    """

    def __init__(
        self,
        binary: ServerBinary,
        *,
        variant: Variant = "plain",
        primaries: int = 3,
        replicas: int = 1,
        node_timeout_ms: int = 1000,
        extra_config: Mapping[str, str] | None = None,
        start_timeout: float = 60.0,
    ) -> None:
        if primaries < 3:
            raise ValueError("a Redis cluster needs at least 3 primaries")
        if replicas < 0:
            raise ValueError("replicas must be >= 0")
        self._security = _Security(binary, variant)
        self._binary = binary
        self._primaries = primaries
        self._replicas = replicas
        self._node_timeout_ms = node_timeout_ms
        self._extra = dict(extra_config or {})
        self._start_timeout = start_timeout
        self._nodes: list[RedisServer] = []

    def __repr__(self) -> str:
        state = ",".join(self.addrs) if self._nodes else "not started"
        variant = self._security.variant
        return f"<RedisCluster {self._binary.kind} {self._binary.version} {variant} {state}>"

    @property
    def binary(self) -> ServerBinary:
        return self._binary

    @property
    def nodes(self) -> list[RedisServer]:
        """Every node process, in creation order (primaries first, as the cli assigns them)."""
        return list(self._nodes)

    @property
    def addrs(self) -> list[str]:
        """``host:port`` of every node."""
        return [f"{node.host}:{node.port}" for node in self._nodes]

    @property
    def node_timeout_ms(self) -> int:
        return self._node_timeout_ms

    def start(self) -> RedisCluster:
        """Start the nodes, join them into a cluster and wait until it serves every slot."""
        if self._nodes:
            return self
        cli = find_cli(self._binary, tls=self.tls)
        config: dict[str, str] = {
            "cluster-enabled": "yes",
            "cluster-config-file": "nodes.conf",
            "cluster-node-timeout": str(self._node_timeout_ms),
            **_FAST_SYNC,
            **self._extra,
        }
        if self.tls:
            config["tls-cluster"] = "yes"
        try:
            self._security.start()
            for _ in range(self._primaries * (1 + self._replicas)):
                node = self._security.server(self._binary, config)
                self._nodes.append(node)
                node.start()
            self._create(cli)
            self.wait_ready(self._start_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _create(self, cli: str) -> None:
        options, env = self._security.cli_options()
        args = [cli, *options, "--cluster", "create", *self.addrs, "--cluster-replicas", str(self._replicas)]
        args.append("--cluster-yes")
        try:
            done = subprocess.run(
                args,
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=_CLI_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise ServerStartError(
                f"{self!r}: '--cluster create' did not finish in {_CLI_TIMEOUT:.0f} s"
            ) from exc
        if done.returncode != 0 or "[OK] All 16384 slots covered" not in done.stdout:
            tail = "\n".join((done.stdout + done.stderr).splitlines()[-20:])
            if self.password:
                tail = tail.replace(self.password, "***")
            raise ServerStartError(f"{self!r}: '--cluster create' failed ({done.returncode}):\n{tail}")

    def stop(self) -> None:
        """Stop every node (by PID) and delete their directories."""
        nodes, self._nodes = self._nodes, []
        for node in reversed(nodes):
            with contextlib.suppress(Exception):
                node.stop()
        self._security.stop()

    def __enter__(self) -> RedisCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ----------------------------------------------------------------- state

    def running_nodes(self) -> list[RedisServer]:
        return [node for node in self._nodes if node.running]

    def _by_addr(self) -> dict[str, RedisServer]:
        return {f"{node.host}:{node.port}": node for node in self._nodes}

    def topology(self, via: RedisServer | None = None) -> list[ClusterNodeInfo]:
        """``CLUSTER NODES`` as seen by ``via`` (default: the first running node)."""
        if via is None:
            running = self.running_nodes()
            if not running:
                raise RuntimeError(f"{self!r} has no running node")
            via = running[0]
        text = _text(_query(via, "CLUSTER", "NODES"))
        servers = self._by_addr()
        return [ClusterNodeInfo(line, servers) for line in text.splitlines() if line.strip()]

    def primaries(self) -> list[RedisServer]:
        """The running nodes that are primaries now (after any failover)."""
        return [
            info.server
            for info in self.topology()
            if info.is_primary
            and info.server is not None
            and info.server.running
            and "fail" not in info.flags
        ]

    def replicas(self) -> list[RedisServer]:
        """The running nodes that are replicas now."""
        return [
            info.server
            for info in self.topology()
            if not info.is_primary and info.server is not None and info.server.running
        ]

    def node_for_slot(self, slot: int) -> RedisServer:
        """The primary serving ``slot`` now."""
        for info in self.topology():
            if not info.is_primary or info.server is None:
                continue
            for part in info.slots:
                if part.startswith("["):
                    continue  # a migrating / importing marker
                low, _, high = part.partition("-")
                if int(low) <= slot <= int(high or low):
                    return info.server
        raise LookupError(f"no primary serves slot {slot}")

    def _node_problem(
        self, node: RedisServer, expected_nodes: int, views: list[frozenset[tuple[str, bool]]]
    ) -> str | None:
        """What keeps ``node`` from being ready, if anything; appends its view of the roles to ``views``."""
        # One connection for every question: a TLS handshake per query slows the polling down.
        try:
            with _client(node) as client:
                return self._node_problem_via(client, node, expected_nodes, views)
        except (redis.RedisError, OSError) as exc:
            return f"{node.port}: {type(exc).__name__}: {exc}"

    def _node_problem_via(
        self,
        client: redis.Redis,
        node: RedisServer,
        expected_nodes: int,
        views: list[frozenset[tuple[str, bool]]],
    ) -> str | None:
        execute: Callable[..., object] = client.execute_command  # untyped in redis-py
        info = _text(execute("CLUSTER", "INFO"))
        nodes_text = _text(execute("CLUSTER", "NODES"))
        fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
        if fields.get("cluster_state") != "ok":
            return f"{node.port}: cluster_state:{fields.get('cluster_state')}"
        if fields.get("cluster_slots_ok") != str(_TOTAL_SLOTS):
            return f"{node.port}: cluster_slots_ok:{fields.get('cluster_slots_ok')}"
        infos = [ClusterNodeInfo(line, {}) for line in nodes_text.splitlines() if line.strip()]
        healthy = [i for i in infos if not (i.flags & _UNSETTLED_FLAGS)]
        if len(healthy) != expected_nodes:
            return f"{node.port}: knows {len(healthy)} healthy nodes of {expected_nodes}"
        views.append(frozenset((i.node_id, i.is_primary) for i in healthy))
        me = next((i for i in infos if "myself" in i.flags), None)
        if me is not None and not me.is_primary:
            # A replica still loading its first copy would make replica reads miss data.
            replication = client.info("replication")
            if replication.get("master_link_status") != "up" or replication.get("master_sync_in_progress"):
                return f"{node.port}: replica not in sync with its primary yet"
        return None

    def wait_ready(self, timeout: float = 60.0, *, expected_nodes: int | None = None) -> None:
        """Wait until every running node says ``cluster_state:ok`` and sees ``expected_nodes``.

        ``expected_nodes`` defaults to the number of running nodes.
        """
        deadline = time.monotonic() + timeout
        while True:
            running = self.running_nodes()
            expected = expected_nodes if expected_nodes is not None else len(running)
            views: list[frozenset[tuple[str, bool]]] = []
            problems = [p for node in running if (p := self._node_problem(node, expected, views)) is not None]
            if not problems and len(set(views)) > 1:
                # Roles spread by gossip: a node may still take a new replica for a
                # primary (without slots), and send it writes that fail as READONLY.
                problems.append("the nodes do not agree yet on which are primaries")
            if not problems:
                return
            if time.monotonic() >= deadline:
                raise ServerStartError(f"{self!r} not ready after {timeout:.0f} s: {'; '.join(problems)}")
            time.sleep(_POLL)

    def flushall(self) -> None:
        """Empty every primary (replicas follow)."""
        for node in self.primaries():
            _query(node, "FLUSHALL")


class RedisSentinel(_SecuredTopology):
    """One primary, ``replicas`` replicas and ``sentinels`` sentinels for ``service_name``.

    Sentinels run the same binary in sentinel mode (started through a
    ``*-sentinel`` link to it, as distributions install ``redis-sentinel``).

    ``variant`` is that of the primary and replicas (see :class:`RedisCluster`);
    the sentinels log in to them with ``sentinel auth-pass`` (and ``auth-user``
    for ``acl``). With ``sentinel_auth`` (the default), the ``password`` and
    ``acl`` variants also protect the sentinels, with a password of their own
    (``sentinel_password``; ``acl``: user ``sentinel_username``, default user
    off), which they also use with each other. In the ``tls`` variant the
    sentinels serve, and connect over, TLS only, with the data nodes' CA.
    """

    def __init__(
        self,
        binary: ServerBinary,
        *,
        variant: Variant = "plain",
        sentinel_auth: bool = True,
        service_name: str = "mymaster",
        replicas: int = 1,
        sentinels: int = 3,
        quorum: int = 2,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
        start_timeout: float = 60.0,
    ) -> None:
        if sentinels < quorum:
            raise ValueError("quorum cannot exceed the number of sentinels")
        self._security = _Security(binary, variant)
        protected = sentinel_auth and variant in ("password", "acl")
        self._sentinel_password = secrets.token_hex(16) if protected else None
        self._binary = binary
        self._service = service_name
        self._replica_count = replicas
        self._sentinel_count = sentinels
        self._quorum = quorum
        self._down_after_ms = down_after_ms
        self._failover_timeout_ms = failover_timeout_ms
        self._start_timeout = start_timeout
        self._data: list[RedisServer] = []
        self._sentinels: list[RedisServer] = []
        self._link_dir: Path | None = None

    def __repr__(self) -> str:
        state = ",".join(self.sentinel_addrs) if self._sentinels else "not started"
        binary, variant = self._binary, self._security.variant
        return f"<RedisSentinel {self._service} {binary.kind} {binary.version} {variant} {state}>"

    @property
    def service_name(self) -> str:
        return self._service

    @property
    def sentinel_username(self) -> str | None:
        """The ACL user of the sentinels (``acl`` variant with ``sentinel_auth``), else ``None``."""
        protected = self._sentinel_password is not None
        return ACL_USER if protected and self._security.variant == "acl" else None

    @property
    def sentinel_password(self) -> str | None:
        """The sentinels' own password, or ``None`` when they need none. Never in ``repr``."""
        return self._sentinel_password

    @property
    def data_nodes(self) -> list[RedisServer]:
        """The primary and replicas, in start order (the first was the initial primary)."""
        return list(self._data)

    @property
    def sentinels(self) -> list[RedisServer]:
        return list(self._sentinels)

    @property
    def sentinel_addrs(self) -> list[str]:
        return [f"{s.host}:{s.port}" for s in self._sentinels]

    def start(self) -> RedisSentinel:
        """Start primary, replicas and sentinels; wait until the sentinels agree on all of them."""
        if self._data:
            return self
        security = self._security
        try:
            security.start()
            primary = security.server(self._binary, _FAST_SYNC)
            self._data.append(primary)
            primary.start()
            for _ in range(self._replica_count):
                replica = security.server(self._binary, {**_FAST_SYNC, "replicaof": f"{HOST} {primary.port}"})
                self._data.append(replica)
                replica.start()
            sentinel_binary = self._sentinel_binary()
            for _ in range(self._sentinel_count):
                sentinel = self._new_sentinel(sentinel_binary, primary.port)
                self._sentinels.append(sentinel)
                sentinel.start()
            self.wait_ready(self._start_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _new_sentinel(self, binary: ServerBinary, primary_port: int) -> RedisServer:
        service, security = self._service, self._security
        config = {
            "sentinel monitor": f"{service} {HOST} {primary_port} {self._quorum}",
            "sentinel down-after-milliseconds": f"{service} {self._down_after_ms}",
            "sentinel failover-timeout": f"{service} {self._failover_timeout_ms}",
            "sentinel parallel-syncs": f"{service} 1",
        }
        if security.password is not None:
            config["sentinel auth-pass"] = f"{service} {security.password}"
            if security.variant == "acl":
                config["sentinel auth-user"] = f"{service} {ACL_USER}"
        if self._sentinel_password is not None:
            # What a sentinel sends to the others (requirepass would do for the
            # default user, but the acl variant turns that user off).
            config["sentinel sentinel-pass"] = self._sentinel_password
            if security.variant == "acl":
                config["sentinel sentinel-user"] = ACL_USER
            return RedisServer(
                binary, security.variant, extra_config=config, password=self._sentinel_password
            )
        if security.variant == "tls":
            # Outgoing links to the data nodes and other sentinels, and the port announced to them.
            config["tls-replication"] = "yes"
            return RedisServer(binary, "tls", extra_config=config, tls_files=security.tls_files)
        return RedisServer(binary, "plain", extra_config=config)

    def _sentinel_binary(self) -> ServerBinary:
        # Sentinel mode needs `--sentinel` or an executable named *-sentinel; RedisServer
        # passes only the config file, so a link with the right name does it.
        self._link_dir = Path(tempfile.mkdtemp(prefix="kivigo-sentinel-bin-"))
        link = self._link_dir / f"{self._binary.kind}-sentinel"
        os.symlink(self._binary.path, link)
        return dataclasses.replace(self._binary, path=str(link))

    def stop(self) -> None:
        """Stop sentinels and data nodes (by PID) and delete their directories."""
        sentinels, self._sentinels = self._sentinels, []
        data, self._data = self._data, []
        for server in [*sentinels, *reversed(data)]:
            with contextlib.suppress(Exception):
                server.stop()
        if self._link_dir is not None:
            shutil.rmtree(self._link_dir, ignore_errors=True)
            self._link_dir = None
        self._security.stop()

    def __enter__(self) -> RedisSentinel:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ----------------------------------------------------------------- state

    def master_addr(self, via: RedisServer | None = None) -> str:
        """``host:port`` of the primary, as a sentinel reports it."""
        sentinel = via or next(s for s in self._sentinels if s.running)
        reply: Any = _query(sentinel, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self._service)
        if not reply:
            raise LookupError(f"the sentinels know no service {self._service!r}")
        return f"{_text(reply[0])}:{_text(reply[1])}"

    def primary(self) -> RedisServer:
        """The data node that is the primary now."""
        addr = self.master_addr()
        for node in self._data:
            if f"{node.host}:{node.port}" == addr:
                return node
        raise LookupError(f"the sentinels name {addr}, which is not one of ours")

    def _sentinel_problem(self, sentinel: RedisServer) -> str | None:
        expected_replicas = self._replica_count
        try:
            raw = _query(sentinel, "SENTINEL", "MASTER", self._service)
        except (redis.RedisError, OSError) as exc:
            return f"sentinel {sentinel.port}: {type(exc).__name__}: {exc}"
        if isinstance(raw, dict):
            state = {_text(k): _text(v) for k, v in raw.items()}
        else:
            items = [_text(v) for v in raw]  # type: ignore[attr-defined]
            state = dict(zip(items[::2], items[1::2], strict=False))
        flags = set(state.get("flags", "").split(","))
        if flags != {"master"}:
            return f"sentinel {sentinel.port}: master flags {sorted(flags)}"
        if int(state.get("num-slaves", 0)) < expected_replicas:
            return f"sentinel {sentinel.port}: sees {state.get('num-slaves')} replicas"
        if int(state.get("num-other-sentinels", 0)) < self._sentinel_count - 1:
            return f"sentinel {sentinel.port}: sees {state.get('num-other-sentinels')} other sentinels"
        return None

    def _replication_problem(self) -> str | None:
        primary = self.master_addr()
        for node in self._data:
            if not node.running or f"{node.host}:{node.port}" == primary:
                continue
            try:
                with _client(node) as client:
                    info = client.info("replication")
            except (redis.RedisError, OSError) as exc:
                return f"replica {node.port}: {type(exc).__name__}: {exc}"
            source = f"{info.get('master_host')}:{info.get('master_port')}"
            if info.get("master_link_status") != "up" or source != primary:
                return f"replica {node.port}: not replicating from {primary} yet"
        return None

    def wait_ready(self, timeout: float = 60.0, *, replication: bool = True) -> None:
        """Wait until every sentinel sees the primary, the replicas and the other sentinels.

        With ``replication``, also until every replica is in sync with the primary
        (after a failover the sentinels reconfigure the old primary only on their
        next 10-second poll).
        """
        deadline = time.monotonic() + timeout
        while True:
            problems = [p for s in self._sentinels if s.running and (p := self._sentinel_problem(s))]
            if not problems and not replication:
                return
            if not problems:
                try:
                    problem = self._replication_problem()
                except (redis.RedisError, OSError) as exc:
                    problem = f"{type(exc).__name__}: {exc}"
                if problem is None:
                    return
                problems.append(problem)
            if time.monotonic() >= deadline:
                raise ServerStartError(f"{self!r} not ready after {timeout:.0f} s: {'; '.join(problems)}")
            time.sleep(_POLL)

    def failover(self, timeout: float = 60.0, *, replication: bool = False) -> str:
        """``SENTINEL FAILOVER`` and wait until a new primary serves writes; return its address.

        With ``replication``, also wait until the old primary replicates from the new one.
        """
        old = self.master_addr()
        _query(next(s for s in self._sentinels if s.running), "SENTINEL", "FAILOVER", self._service)
        deadline = time.monotonic() + timeout
        while True:
            problem: str | None
            try:
                new = self.master_addr()
                if new == old:
                    problem = "the sentinels still name the old primary"
                else:
                    role = _query(self.primary(), "ROLE")
                    problem = None if _text(role[0]) == "master" else f"{new} is not a primary yet"  # type: ignore[index]
            except (redis.RedisError, OSError, LookupError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            if problem is None:
                self.wait_ready(max(1.0, deadline - time.monotonic()), replication=replication)
                return new
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{self!r}: failover did not complete in {timeout:.0f} s: {problem}")
            time.sleep(_POLL)

    def flushall(self) -> None:
        """Empty the primary (replicas follow)."""
        _query(self.primary(), "FLUSHALL")
