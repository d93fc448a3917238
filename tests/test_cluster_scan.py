"""Listing a cluster's keys while its hash slots migrate, on real Valkey / Redis clusters.

Walking the primaries one after another misses a key whose slot moves from a
primary not yet walked to one already walked, and yields twice a key moving the
other way. ``scan_cluster`` must yield every key present for the whole scan
exactly once: whatever the timing of the migration, in the middle of one, while
slots move back and forth, and without counting replicas' copies.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import pytest
import redis
from redis.asyncio.cluster import ClusterNode, PipelineCommand
from redis.asyncio.cluster import RedisCluster as AsyncCluster
from redis.crc import key_slot

from kivigo_async import Client
from kivigo_async.backends.redis import RedisClusterBackend, RedisClusterOptions, _cluster_scan
from kivigo_async.backends.redis._cluster_scan import scan_cluster
from kivigo_async.errors import (
    BackendError,
    BackendUnavailableError,
    InvalidArgumentError,
    InvalidKeyError,
)
from kivigo_async.testing.pytest_plugin import ClusterFactory
from kivigo_async.testing.servers import BinaryKind, RedisServer
from kivigo_async.testing.topologies import RedisCluster, wait_replicated

pytestmark = [pytest.mark.server, pytest.mark.timeout(240)]

PREFIX = "scan:"
#: Per group: keys under PREFIX, and keys of the same slot that are not (never listed).
GROUP_SIZE = 12
OUTSIDERS = 3


# -- helpers ---------------------------------------------------------------------------------


def sync_client(node: RedisServer) -> redis.Redis:
    return redis.Redis(host=node.host, port=node.port, socket_timeout=10)


def text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def name(node: RedisServer) -> str:
    return f"{node.host}:{node.port}"


def node_id(node: RedisServer) -> str:
    with sync_client(node) as client:
        return text(client.execute_command("CLUSTER MYID"))


def slots_by_primary(cluster: RedisCluster) -> dict[RedisServer, set[int]]:
    """The slots each primary serves, as it says itself (gossip may lag behind)."""
    layout: dict[RedisServer, set[int]] = {}
    for node in cluster.primaries():
        me = next(info for info in cluster.topology(via=node) if "myself" in info.flags)
        slots: set[int] = set()
        for part in me.slots:
            if not part.startswith("["):  # not a migration marker
                low, _, high = part.partition("-")
                slots.update(range(int(low), int(high or low) + 1))
        if slots:
            layout[node] = slots
    return layout


def owner_map(cluster: RedisCluster) -> dict[int, RedisServer]:
    return {slot: node for node, slots in slots_by_primary(cluster).items() for slot in slots}


def tags_on(slots: set[int], count: int, taken: set[str]) -> list[str]:
    """``count`` new hash tags whose slots are among ``slots``, one slot each."""
    found: list[str] = []
    used = {key_slot(tag.encode()) for tag in taken}
    for i in itertools.count():
        tag = f"g{i}"
        slot = key_slot(tag.encode())
        if slot in slots and slot not in used:
            found.append(tag)
            used.add(slot)
            taken.add(tag)
            if len(found) == count:
                return found
    raise AssertionError("unreachable")


def group(tag: str) -> list[str]:
    """Keys sharing the slot of ``tag``: GROUP_SIZE under PREFIX, OUTSIDERS not."""
    inside = [f"{PREFIX}{{{tag}}}:{i}" for i in range(GROUP_SIZE)]
    return inside + [f"zzz:{{{tag}}}:{i}" for i in range(OUTSIDERS)]


async def fill(
    backend: RedisClusterBackend, cluster: RedisCluster, groups_per_primary: int
) -> dict[int, str]:
    """Write plain keys (every primary) and tagged groups (``groups_per_primary`` each); slot -> tag."""
    taken: set[str] = set()
    groups = {
        key_slot(tag.encode()): tag
        for slots in slots_by_primary(cluster).values()
        for tag in tags_on(slots, groups_per_primary, taken)
    }
    keys = [f"{PREFIX}plain:{i}" for i in range(150)] + [f"other:{i}" for i in range(30)]
    keys += [key for tag in groups.values() for key in group(tag)]
    await Client(backend).batch_set(dict.fromkeys(keys, 1))
    return groups


async def listed(backend: RedisClusterBackend) -> list[str]:
    """What should be listed under PREFIX: every key there, read back through the same client."""
    return sorted([key async for key in Client(backend).iter_keys(PREFIX)])


def begin_migration(source: RedisServer, target: RedisServer, slot: int) -> None:
    with sync_client(source) as src, sync_client(target) as dst:
        dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", node_id(source))
        src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", node_id(target))


def move_keys(
    source: RedisServer,
    target: RedisServer,
    slot: int,
    *,
    limit: int | None = None,
    copy: bool = False,
    batch: int = 5,
    pause: float = 0.0,
    step: Callable[[], None] | None = None,
) -> int:
    """``MIGRATE`` the slot's keys (up to ``limit``) a few at a time, as ``--cluster reshard`` does."""
    moved = 0
    with sync_client(source) as src:
        while limit is None or moved < limit:
            size = batch if limit is None else min(batch, limit - moved)
            keys = src.execute_command("CLUSTER GETKEYSINSLOT", slot, size)
            if not keys:
                break
            options = ["COPY", "REPLACE"] if copy else ["REPLACE"]
            src.execute_command("MIGRATE", target.host, target.port, "", 0, 5000, *options, "KEYS", *keys)
            moved += len(keys)
            if step is not None:
                step()
            if pause:
                time.sleep(pause)
    return moved


def finish_migration(cluster: RedisCluster, slot: int, target: RedisServer) -> None:
    """``SETSLOT NODE`` on the new owner first, then on the other primaries."""
    target_id = node_id(target)
    for node in [target, *(p for p in cluster.primaries() if p is not target)]:
        with sync_client(node) as client:
            client.execute_command("CLUSTER SETSLOT", slot, "NODE", target_id)


def migrate_slot(
    cluster: RedisCluster,
    slot: int,
    target: RedisServer,
    *,
    batch: int = 5,
    pause: float = 0.0,
    step: Callable[[], None] | None = None,
) -> None:
    source = owner_map(cluster)[slot]
    assert source is not target
    begin_migration(source, target, slot)
    if step is not None:
        step()
    move_keys(source, target, slot, batch=batch, pause=pause, step=step)
    finish_migration(cluster, slot, target)
    if step is not None:
        step()


async def primary_by_primary(cluster: AsyncCluster, prefix: str) -> AsyncIterator[bytes]:
    """The scan ``scan_cluster`` replaces: each primary in turn, ``SCAN`` to the end."""
    await cluster.initialize()
    for node in cluster.get_primaries():
        cursor = 0
        while True:
            cursor, keys = await node.execute_command("SCAN", cursor, "MATCH", f"{prefix}*", "COUNT", 1000)
            for key in keys:
                yield key
            if cursor == 0:
                break


async def collect(keys: AsyncIterator[bytes]) -> Counter[str]:
    return Counter([key.decode() async for key in keys])


async def collect_stepping(
    keys: AsyncIterator[bytes],
    owner_of: dict[int, RedisServer],
    between: Callable[[RedisServer, RedisServer], None],
) -> Counter[str]:
    """Collect ``keys``; when they start coming from a second primary, call ``between(first, second)``.

    Keys come from one primary after another, so by then the first primary has
    been walked to the end and the third not yet touched.
    """
    out: list[str] = []
    first: RedisServer | None = None
    called = False
    async for key in keys:
        out.append(key.decode())
        owner = owner_of[key_slot(key)]
        if first is None:
            first = owner
        elif owner is not first and not called:
            called = True
            await asyncio.to_thread(between, first, owner)
    assert called, "the keys never came from a second primary"
    return Counter(out)


def duplicated(counts: Counter[str]) -> set[str]:
    return {key for key, n in counts.items() if n > 1}


def exactly_once(counts: Counter[str], expected: Iterable[str]) -> None:
    want = Counter(expected)
    missing, extra = sorted(want - counts), sorted(counts - want)
    assert not missing, f"missing {missing[:5]} ({len(missing)})"
    assert not extra, f"extra {extra[:5]} ({len(extra)})"


# -- tests -----------------------------------------------------------------------------------


async def scan_while_a_slot_moves(
    cluster: RedisCluster, keys: AsyncIterator[bytes], groups: dict[int, str], toward_walked: bool
) -> tuple[Counter[str], int]:
    """Collect ``keys`` while a group's slot moves, once the first primary is walked.

    ``toward_walked``: from the primary not walked yet to the one walked; else the
    other way. Returns what was listed, and the slot that moved.
    """
    owner_of = owner_map(cluster)
    primaries = list(slots_by_primary(cluster))
    moved: list[int] = []

    def move(first: RedisServer, second: RedisServer) -> None:
        third = next(p for p in primaries if p is not first and p is not second)
        source, target = (third, first) if toward_walked else (first, third)
        slot = next(slot for slot in groups if owner_of[slot] is source)
        migrate_slot(cluster, slot, target)
        moved.append(slot)

    counts = await collect_stepping(keys, owner_of, move)
    return counts, moved[0]


async def test_slot_moving_mid_scan_is_neither_missed_nor_repeated(
    redis_cluster_factory: ClusterFactory,
) -> None:
    """Between two steps of a scan, a slot's keys move to a primary already walked, or from one.

    The primary-by-primary walk misses them in the first case and yields them
    twice in the second; ``scan_cluster`` yields every key once in both.
    """
    cluster = redis_cluster_factory(node_timeout_ms=5000)
    backend = RedisClusterBackend(RedisClusterOptions(addrs=cluster.addrs))
    try:
        groups = await fill(backend, cluster, groups_per_primary=3)
        expected = await listed(backend)
        assert len(expected) == 150 + 9 * GROUP_SIZE
        for toward_walked in (True, False):
            old, slot = await scan_while_a_slot_moves(
                cluster, primary_by_primary(backend.cluster, PREFIX), groups, toward_walked
            )
            moved_keys = {key for key in expected if key_slot(key.encode()) == slot}
            assert len(moved_keys) == GROUP_SIZE
            if toward_walked:
                assert set(expected) - set(old) == moved_keys, "the old walk should miss them"
                assert not duplicated(old)
            else:
                assert duplicated(old) == moved_keys, "the old walk should repeat them"
                assert set(old) == set(expected)

            new, _ = await scan_while_a_slot_moves(
                cluster, scan_cluster(backend.cluster, PREFIX, run=backend._run), groups, toward_walked
            )
            exactly_once(new, expected)
        assert await listed(backend) == expected  # nothing was lost by the moves themselves
    finally:
        await backend.close()


@pytest.mark.parametrize("kind", ["valkey", "redis"])
async def test_slot_in_the_middle_of_a_migration(
    redis_cluster_factory: ClusterFactory, kind: BinaryKind, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slot marked MIGRATING / IMPORTING with its keys split over both nodes, one key on both.

    Valkey 8 scans slot by slot; Redis 7.0 does not (the other way of remembering keys).
    """
    # A slot is read with one CLUSTER GETKEYSINSLOT, or with a filtered SCAN walk
    # when it fills the reply: with 4 keys a reply, a group's slot takes the walk.
    monkeypatch.setattr(_cluster_scan, "_GETKEYS_COUNT", 4)
    asked: list[int] = []
    send = _cluster_scan._ClusterScan._send

    # Each walk's wanted slots and the cursors of the SCANs it sent (walks run one at a time).
    walks: list[tuple[list[int], list[int]]] = []
    walk = _cluster_scan._ClusterScan._walk

    async def recording_send(
        self: Any, node: ClusterNode, commands: list[tuple[Any, ...]], *args: Any, **kw: Any
    ) -> Any:
        asked.extend(c[3] for c in commands if c[:2] == ("CLUSTER", "GETKEYSINSLOT"))
        if walks:
            walks[-1][1].extend(int(c[1]) for c in commands if c[0] == "SCAN")
        return await send(self, node, commands, *args, **kw)

    def recording_walk(self: Any, layout: Any, node_id: str, mask: bytearray, *args: Any, **kw: Any) -> Any:
        walks.append(([i for i, wanted in enumerate(mask) if wanted], []))
        return walk(self, layout, node_id, mask, *args, **kw)

    monkeypatch.setattr(_cluster_scan._ClusterScan, "_send", recording_send)
    monkeypatch.setattr(_cluster_scan._ClusterScan, "_walk", recording_walk)
    cluster = redis_cluster_factory(kind, node_timeout_ms=5000)
    backend = RedisClusterBackend(RedisClusterOptions(addrs=cluster.addrs))
    try:
        groups = await fill(backend, cluster, groups_per_primary=1)
        expected = await listed(backend)
        owner_of = owner_map(cluster)
        slot = next(iter(groups))
        source = owner_of[slot]
        # Keys in the source's slots after the migrating one: what a walk of that one
        # slot must not go on to read.
        later = [f"{PREFIX}later:{i}" for i in range(5000)]
        later = [k for k in later if key_slot(k.encode()) > slot and owner_of[key_slot(k.encode())] is source]
        assert len(later) >= 200
        await backend.batch_set([(key, b"1") for key in later[:200]])
        expected = await listed(backend)
        target = next(p for p in slots_by_primary(cluster) if p is not source)
        begin_migration(source, target, slot)
        assert move_keys(source, target, slot, limit=GROUP_SIZE // 2) == GROUP_SIZE // 2
        with sync_client(source) as src, sync_client(target) as dst:
            left = sorted(text(k) for k in src.execute_command("CLUSTER GETKEYSINSLOT", slot, 100))
            copied = next(k for k in left if k.startswith(PREFIX))
            # A tool that copies, then deletes, leaves a key on both nodes for a while.
            src.execute_command("MIGRATE", target.host, target.port, copied, 0, 5000, "COPY")
            assert dst.execute_command("CLUSTER COUNTKEYSINSLOT", slot) == GROUP_SIZE // 2 + 1
        assert len(left) == GROUP_SIZE + OUTSIDERS - GROUP_SIZE // 2

        old = await collect(primary_by_primary(backend.cluster, PREFIX))
        assert duplicated(old) == {copied}
        exactly_once(await collect(scan_cluster(backend.cluster, PREFIX, run=backend._run)), expected)
        # Never a larger reply than the one page a slot is asked for.
        assert set(asked) == {4}
        walks.clear()
        exactly_once(await collect(scan_cluster(backend.cluster, PREFIX, count=5)), expected)
        crowded = [cursors for wanted, cursors in walks if wanted == [slot]]
        assert crowded, "the crowded slot was not read by a walk"
        if kind == "valkey":
            # Slot by slot, the walk stops once past the slot: no page of later slots.
            assert all(cursor & 16383 <= slot for cursors in crowded for cursor in cursors), crowded

        def complete(first: RedisServer, second: RedisServer) -> None:
            move_keys(source, target, slot)
            finish_migration(cluster, slot, target)

        counts = await collect_stepping(
            scan_cluster(backend.cluster, PREFIX, run=backend._run), owner_of, complete
        )
        exactly_once(counts, expected)
        assert owner_map(cluster)[slot] is target
        assert await listed(backend) == expected
    finally:
        await backend.close()


async def test_scans_stay_exact_while_slots_move_back_and_forth(
    redis_cluster_factory: ClusterFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A thread keeps moving six slots between two primaries each while scans run one after another.

    Every scan, slot-ordered or not, must list exactly the keys that never change.
    """
    cluster = redis_cluster_factory(node_timeout_ms=5000)
    backend = RedisClusterBackend(RedisClusterOptions(addrs=cluster.addrs))
    caplog.set_level(logging.DEBUG, logger="kivigo_async.scan")
    stop = threading.Event()
    steps = [0]  # migration steps taken (SETSLOT, MIGRATE), by the mover thread

    def step() -> None:
        steps[0] += 1

    try:
        groups = await fill(backend, cluster, groups_per_primary=2)
        expected = await listed(backend)
        primaries = list(slots_by_primary(cluster))
        owner_of = owner_map(cluster)
        homes = {
            slot: (owner_of[slot], primaries[(primaries.index(owner_of[slot]) + 1) % 3]) for slot in groups
        }

        def mover() -> None:
            for rounds in itertools.count():
                for slot, (home, away) in homes.items():
                    if stop.is_set():
                        return
                    migrate_slot(
                        cluster, slot, away if rounds % 2 == 0 else home, batch=3, pause=0.002, step=step
                    )

        moving = asyncio.create_task(asyncio.to_thread(mover))
        scans = overlapped = again = 0
        deadline = time.monotonic() + 60
        try:
            while time.monotonic() < deadline and not moving.done():
                before = steps[0]
                ordered = (None, False)[scans % 2]
                keys = scan_cluster(backend.cluster, PREFIX, run=backend._run, count=10, slot_ordered=ordered)
                exactly_once(await collect(keys), expected)
                scans += 1
                overlapped += steps[0] != before
                again = sum("reading them again" in r.getMessage() for r in caplog.records)
                if scans >= 16 and overlapped >= 10 and again >= 3:
                    break
        finally:
            stop.set()
            await asyncio.wait_for(moving, 120)
        summary = f"{scans} scans, {overlapped} during a migration step, {again} passes over moved slots"
        print(summary)
        assert overlapped >= 10, summary
        assert again >= 3, summary
        assert await listed(backend) == expected
    finally:
        stop.set()
        await backend.close()


async def test_replicas_never_add_duplicates(redis_cluster_factory: ClusterFactory) -> None:
    """Replicas hold a copy of every key; the scan never asks them, even with replica reads on."""
    cluster = redis_cluster_factory(node_timeout_ms=5000)
    backend = RedisClusterBackend(RedisClusterOptions(addrs=cluster.addrs, read_from_replicas=True))
    try:
        await backend.connect()
        groups = await fill(backend, cluster, groups_per_primary=1)
        expected = await listed(backend)
        slot = next(iter(groups))
        source = owner_map(cluster)[slot]
        target = next(p for p in slots_by_primary(cluster) if p is not source)
        begin_migration(source, target, slot)  # a migrating slot is read on two primaries
        move_keys(source, target, slot, limit=GROUP_SIZE // 2)
        for primary in cluster.primaries():
            assert wait_replicated(primary) == 1
        replicas = cluster.replicas()
        assert len(replicas) == 3
        for replica in replicas:
            with sync_client(replica) as direct:
                assert direct.dbsize() > 0
                direct.config_resetstat()

        exactly_once(await collect(scan_cluster(backend.cluster, PREFIX, run=backend._run)), expected)
        assert await Client(backend).list(PREFIX) == expected

        for replica in replicas:
            with sync_client(replica) as direct:
                stats: dict[str, Any] = direct.info("commandstats")
            asked = [c for c in stats if c.startswith(("cmdstat_scan", "cmdstat_cluster"))]
            assert not asked, f"replica {name(replica)} was asked {asked}"
    finally:
        await backend.close()


async def test_errors_and_lost_connections(
    redis_cluster_factory: ClusterFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Bad arguments; connections killed mid-scan (retried); a layout that does not settle
    in time; slots no primary serves."""
    cluster = redis_cluster_factory(node_timeout_ms=5000)
    backend = RedisClusterBackend(RedisClusterOptions(addrs=cluster.addrs))
    try:
        with pytest.raises(InvalidArgumentError, match="count"):
            await collect(scan_cluster(backend.cluster, PREFIX, count=0))
        with pytest.raises(InvalidArgumentError, match="max_passes"):
            await collect(scan_cluster(backend.cluster, PREFIX, max_passes=0))
        with pytest.raises(InvalidKeyError, match="UTF-8"):
            await collect(scan_cluster(backend.cluster, "bad\ud800"))

        groups = await fill(backend, cluster, groups_per_primary=2)
        expected = await listed(backend)
        owner_of = owner_map(cluster)

        def kill_connections(first: RedisServer, second: RedisServer) -> None:
            for node in slots_by_primary(cluster):
                with sync_client(node) as direct:
                    assert direct.execute_command("CLIENT KILL", "TYPE", "normal", "SKIPME", "yes") > 0

        caplog.set_level(logging.DEBUG, logger="kivigo_async.scan")
        counts = await collect_stepping(
            scan_cluster(backend.cluster, PREFIX, run=backend._run, count=20), owner_of, kill_connections
        )
        exactly_once(counts, expected)
        assert any("trying again" in record.getMessage() for record in caplog.records)

        def move_back(first: RedisServer, second: RedisServer) -> None:
            third = next(p for p in slots_by_primary(cluster) if p is not first and p is not second)
            migrate_slot(cluster, next(s for s in groups if owner_of[s] is third), first)

        with pytest.raises(BackendError, match="kept changing") as info:
            await collect_stepping(scan_cluster(backend.cluster, PREFIX, max_passes=1), owner_of, move_back)
        assert not isinstance(info.value, BackendUnavailableError)

        # No primary serves this slot any more: its keys cannot be listed, and saying so beats a short list.
        unserved = next(iter(groups))
        for node in cluster.running_nodes():
            with sync_client(node) as direct:
                direct.execute_command("CLUSTER DELSLOTS", unserved)
        with pytest.raises(BackendUnavailableError, match=rf"\({unserved}\) is served by no primary"):
            await collect(scan_cluster(backend.cluster, PREFIX, run=backend._run))
    finally:
        await backend.close()


async def test_client_list_while_a_slot_moves(
    redis_cluster_factory: ClusterFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``Client.list`` on a RedisClusterBackend: a slot moves right after the first primary is walked.

    The move is made to happen at that moment by watching the SCAN replies the
    cluster client receives; it takes a slot from a primary not walked yet.
    """
    cluster = redis_cluster_factory(node_timeout_ms=5000)
    backend = RedisClusterBackend(RedisClusterOptions(addrs=cluster.addrs))
    scanned: set[str] = set()
    moved: list[int] = []
    real_command = ClusterNode.execute_command
    real_pipeline = ClusterNode.execute_pipeline

    async def after_scan(node: ClusterNode, cursor: int) -> None:
        scanned.add(node.name)
        if cursor != 0 or moved:
            return
        layout = slots_by_primary(cluster)
        target = next(p for p in layout if name(p) == node.name)
        source = next(p for p in layout if name(p) not in scanned)
        slot = next(s for s in groups if s in layout[source])
        await asyncio.to_thread(migrate_slot, cluster, slot, target)
        moved.append(slot)

    async def command(node: ClusterNode, *args: Any, **kwargs: Any) -> Any:
        result = await real_command(node, *args, **kwargs)
        if args and args[0] == "SCAN":
            await after_scan(node, int(result[0]))
        return result

    async def pipeline(node: ClusterNode, commands: list[PipelineCommand]) -> bool:
        result = await real_pipeline(node, commands)
        for done in commands:
            if done.args[0] == "SCAN" and not isinstance(done.result, Exception):
                await after_scan(node, int(done.result[0]))
        return result

    try:
        async with Client(backend) as client:
            groups = await fill(backend, cluster, groups_per_primary=2)
            expected = await client.list(PREFIX)
            monkeypatch.setattr(ClusterNode, "execute_command", command)
            monkeypatch.setattr(ClusterNode, "execute_pipeline", pipeline)
            during = await client.list(PREFIX)
            monkeypatch.undo()
            assert moved, "the slot never moved"
            assert during == expected
            assert await client.list(PREFIX) == expected
    finally:
        monkeypatch.undo()
        await backend.close()


@pytest.mark.parametrize(
    ("kind", "info_allowed"),
    [("valkey", True), ("redis", True), ("valkey", False)],
    ids=["valkey", "redis", "valkey-info-refused"],
)
async def test_primary_restarting_mid_walk_is_neither_missed_nor_repeated(
    redis_cluster_factory: ClusterFactory, kind: BinaryKind, info_allowed: bool
) -> None:
    """A primary restarts after a page of its walk: same node id, epoch, slots and keys.

    The new process hashes keys with a seed of its own, so the cursor the walk
    holds would skip some keys and repeat others there, with no error. Where the
    ACL refuses INFO (no run_id to compare), the lost connection is the only sign.
    """
    # A long node timeout: the restart must not look like a failure and promote a replica.
    cluster = redis_cluster_factory(kind, node_timeout_ms=15000)
    backend = RedisClusterBackend(RedisClusterOptions(addrs=cluster.addrs))
    big = key_slot(b"big")
    victim = owner_map(cluster)[big]
    # Several pages in one slot: a slot-ordered cursor stops in the middle of it.
    expected = [f"{PREFIX}{i}" for i in range(20000)] + [f"{PREFIX}{{big}}:{i}" for i in range(5000)]
    try:
        client = Client(backend)
        for i in range(0, len(expected), 2500):
            await client.batch_set(dict.fromkeys(expected[i : i + 2500], 1))
        with sync_client(victim) as direct:
            direct.execute_command("SAVE")  # the test servers save nothing on shutdown
        if not info_allowed:
            # Not kept across the restart, which is fine: the walk learned no run_id before it.
            for node in slots_by_primary(cluster):
                with sync_client(node) as direct:
                    direct.execute_command("ACL", "SETUSER", "default", "-info")
        listed_keys: list[str] = []
        restarted = False
        async for key in client.iter_keys(PREFIX):
            listed_keys.append(key)
            if not restarted and key_slot(key.encode()) == big:
                restarted = True
                await asyncio.to_thread(victim.restart)
        assert restarted, "the walk never reached the victim's big slot"
        exactly_once(Counter(listed_keys), expected)
    finally:
        await backend.close()
