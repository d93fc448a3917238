"""Listing the keys of a Redis / Valkey cluster exactly once, while its slots migrate.

A cluster spreads 16,384 hash slots over its primaries, and a resharding
moves a slot from one primary to another key by key (``CLUSTER SETSLOT
IMPORTING`` / ``MIGRATING``, ``MIGRATE``, ``CLUSTER SETSLOT NODE``). Walking
the primaries one after another with ``SCAN`` misses a key that moves from a
primary not yet walked to one already walked, and yields twice a key that
moves the other way. :func:`scan_cluster` fixes both:

1. It reads the layout first: every primary's own line of ``CLUSTER NODES``
   (the slots it claims, the migrations it takes part in, its config epoch),
   in parallel, in one round trip.
2. It walks each primary with ``SCAN``, keeping only keys of the slots that
   primary is to answer for, so a key that moved in from elsewhere is never
   yielded a second time. Each page goes out together with a fresh
   ``CLUSTER NODES`` on the same connection (still one round trip per page):
   a slot that the primary gave away, started migrating, or may have lost
   and regained (its config epoch moved) is set aside before its keys could
   be missed. So are the slots not yet walked when the primary restarted
   (its ``run_id``, asked with ``INFO server`` beside each page, changed):
   a cursor means nothing to another server process.
3. Slots that were migrating, or were set aside, are read again on every node
   that may hold their keys, migration sources before targets, with
   ``CLUSTER GETKEYSINSLOT`` (or a filtered ``SCAN`` when there are many, or
   when a slot holds more keys than one reply should),
   skipping keys already yielded. A migrating slot counts as read only when
   the layout read after the pass still shows it as before the pass; pass
   after pass, until every slot is settled or ``max_passes`` is reached.

Without migrations this costs what a plain walk costs: one ``SCAN`` round
trip per page per primary, plus the layout read before the walk.

The guarantee assumes what every resharding tool does (``redis-cli`` /
``valkey-cli --cluster reshard``, cluster managers): a slot's keys leave a
primary only while it marks the slot ``MIGRATING``, and they go to a primary
marking it ``IMPORTING``. Keys left behind by an aborted migration (on a node
that neither owns nor imports their slot) are unreachable for every client,
and are not listed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sys
from binascii import crc_hqx
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Union

from redis.asyncio.cluster import ClusterNode, NodesManager, PipelineCommand, RedisCluster
from redis.cluster import PRIMARY
from redis.crc import key_slot
from redis.exceptions import ConnectionError as DriverConnectionError
from redis.exceptions import TimeoutError as DriverTimeoutError

from ...errors import BackendError, BackendUnavailableError, InvalidArgumentError, InvalidKeyError
from ._scan import SCAN_COUNT, match_pattern

__all__ = ["MAX_PASSES", "Run", "node_at", "scan_cluster"]

#: Runs one call to the cluster: ``run(command, key, call)`` awaits ``call()``
#: and turns driver errors into :mod:`kivigo_async.errors` (see
#: ``RedisClusterBackend._run``). The default runs the call as it is.
Run = Callable[[str, Union[str, None], Callable[[], Awaitable[Any]]], Awaitable[Any]]  # noqa: UP007

#: Passes over the slots before giving up on a layout that never settles.
MAX_PASSES: Final = 10

_SLOTS: Final = 16384
# Valkey 8 and Redis 7.4 keep one table per slot and SCAN them in slot order:
# the low 14 bits of the cursor name the slot the next call resumes in.
_SLOT_BITS: Final = _SLOTS - 1
# A node with this many slots or fewer to re-read gets CLUSTER GETKEYSINSLOT
# calls; more, and one filtered SCAN walk is cheaper.
_GETKEYS_MAX_SLOTS: Final = 32
# Keys asked for per slot by CLUSTER GETKEYSINSLOT; a slot that fills the reply is read
# with a filtered SCAN walk instead, page by page.
_GETKEYS_COUNT: Final = 1024
# Between passes the layout is given a moment to settle (a SETSLOT NODE reaches
# the primaries one by one): 10 ms, doubling, at most a quarter of a second.
_PAUSE: Final = 0.01
_PAUSE_MAX: Final = 0.25
# Nodes that CLUSTER NODES lists but that cannot be asked anything.
_UNREACHABLE: Final = frozenset({"handshake", "noaddr"})
# INFO fields naming a server's version that Redis and Valkey send; any other
# "*_version" field means another implementation of the protocol.
_KNOWN_VERSIONS: Final = frozenset({"redis_version", "valkey_version", "gcc_version"})
_MIGRATING: Final = "migrating"
_IMPORTING: Final = "importing"
# A lost connection or a timeout: worth another try on the same node.
_LOST: Final = (DriverConnectionError, DriverTimeoutError)

_log = logging.getLogger("kivigo_async.scan")


async def _direct(command: str, key: str | None, call: Callable[[], Awaitable[Any]]) -> Any:
    return await call()


async def scan_cluster(
    cluster: RedisCluster,
    prefix: str,
    *,
    run: Run = _direct,
    count: int = SCAN_COUNT,
    max_passes: int = MAX_PASSES,
    slot_ordered: bool | None = None,
) -> AsyncIterator[bytes]:
    """Yield every key of ``cluster`` that starts with the literal ``prefix``, each once.

    A key that exists under ``prefix`` for the whole scan is yielded, even when
    its slot migrates meanwhile, and no key is yielded twice. A key created or
    deleted during the scan may or may not be yielded. Replicas are never read.

    Memory: to drop duplicates the scan remembers keys it yielded, but only
    while they could come back: on Valkey 8+ and Redis 7.4+ (whose ``SCAN``
    goes slot by slot), the keys of the page being read and of the slot still
    being read; on older servers, the keys it yielded from the primary it is
    walking, until that walk ends; and the keys of slots that were migrating,
    until a later pass has settled them. Listing a cluster that is not being
    resharded therefore holds at most a page (``count`` keys) plus one slot's
    keys (one primary's on older servers), however many keys match.

    Args:
        cluster: a ``redis.asyncio.cluster.RedisCluster`` (``decode_responses=False``).
        prefix: the literal prefix; glob characters in it match themselves.
        run: runs each call to the cluster, e.g. to bound calls in flight and
            translate errors; the default runs it as it is.
        count: the ``COUNT`` hint of each ``SCAN`` call.
        max_passes: passes over migrating slots before giving up.
        slot_ordered: whether the primaries' ``SCAN`` goes slot by slot;
            ``None`` reads it from ``INFO server``. ``False`` is always safe.

    Raises:
        BackendError: slots were still moving after ``max_passes`` passes (keys
            yielded before are correct, but the listing is incomplete).
        BackendUnavailableError: some slots are served by no primary (one is
            down), or a primary cannot be reached.

    Example:
        ```python
        async for key in scan_cluster(backend.cluster, "user:"):
            print(key)  # bytes
        ```
    """
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise InvalidArgumentError(f"count must be a positive int, not {count!r}")
    if not isinstance(max_passes, int) or isinstance(max_passes, bool) or max_passes < 1:
        raise InvalidArgumentError(f"max_passes must be a positive int, not {max_passes!r}")
    try:
        raw_prefix = prefix.encode("utf-8", "surrogateescape")
        pattern = match_pattern(prefix).encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as exc:
        raise InvalidKeyError(
            f"SCAN: the prefix {prefix!r} cannot be encoded as UTF-8 (a lone surrogate?)"
        ) from exc
    scan = _ClusterScan(cluster, run, raw_prefix, pattern, count, slot_ordered)
    async for page in scan.pages(max_passes):
        for key in page:
            yield key


# -- the layout ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Line:
    """One line of ``CLUSTER NODES``."""

    node_id: str
    host: str
    port: int
    flags: frozenset[str]
    epoch: int
    claims: tuple[str, ...]  # the slot fields as sent: "0-5460", "[5461->-<id>]"

    @property
    def primary(self) -> bool:
        return "master" in self.flags

    @functools.cached_property
    def ranges(self) -> tuple[tuple[int, int], ...]:
        ranges = []
        for claim in self.claims:
            if not claim.startswith("["):
                low, _, high = claim.partition("-")
                ranges.append((int(low), int(high or low)))
        return tuple(ranges)

    @functools.cached_property
    def markers(self) -> frozenset[tuple[int, str, str]]:
        """``(slot, "migrating" | "importing", peer id)`` for each migration this node takes part in."""
        found = set()
        for claim in self.claims:
            if claim.startswith("["):
                body = claim.strip("[]")
                if "->-" in body:
                    slot, _, peer = body.partition("->-")
                    found.add((int(slot), _MIGRATING, sys.intern(peer)))
                elif "-<-" in body:
                    slot, _, peer = body.partition("-<-")
                    found.add((int(slot), _IMPORTING, sys.intern(peer)))
        return frozenset(found)

    def view(self, slot: int) -> tuple[bool, frozenset[tuple[int, str, str]]]:
        """Whether this node claims ``slot``, and its migration markers for it."""
        owns = any(low <= slot <= high for low, high in self.ranges)
        return owns, frozenset(m for m in self.markers if m[0] == slot)

    def owned(self) -> set[int]:
        return {slot for low, high in self.ranges for slot in range(low, high + 1)}


def _parse_nodes(reply: bytes | str) -> list[_Line]:
    text = reply if isinstance(reply, bytes) else reply.encode()
    return [line for row in text.splitlines() if (line := _parse_line(row)) is not None]


@functools.lru_cache(maxsize=128)
def _parse_line(row: bytes) -> _Line | None:
    # A node's own line is the same page after page: parsed once, it costs a lookup.
    fields = row.decode().split()
    if len(fields) < 8:
        return None
    # "host:port@bus-port[,hostname]"; an IPv6 host has colons of its own.
    host, _, port = fields[1].partition("@")[0].rpartition(":")
    return _Line(
        node_id=sys.intern(fields[0]),
        host=host,
        port=int(port or 0),
        flags=frozenset(fields[2].split(",")),
        epoch=int(fields[6]),
        claims=tuple(fields[8:]),
    )


def _myself(reply: Any) -> _Line:
    """The line of the node that sent this ``CLUSTER NODES`` reply."""
    text = reply if isinstance(reply, bytes) else str(reply).encode()
    at = text.find(b"myself")
    line = None
    if at >= 0:
        end = text.find(b"\n", at)
        line = _parse_line(text[text.rfind(b"\n", 0, at) + 1 : None if end < 0 else end])
    if line is None or "myself" not in line.flags:
        raise BackendError("CLUSTER NODES: the reply has no line for the node itself")
    return line


def _moved(before: _Line, after: _Line) -> set[int]:
    """Slots whose ownership or migration markers differ between two lines of one node."""
    if before.claims == after.claims:
        return set()
    changed = before.owned() ^ after.owned()
    changed.update(slot for slot, _, _ in before.markers ^ after.markers)
    return changed


def _run_id(info: object) -> str | None:
    """The server process's ``run_id`` from an ``INFO server`` reply; ``None`` when INFO was refused."""
    if isinstance(info, Mapping) and "run_id" in info:
        return str(info["run_id"])
    return None


def _slot_ordered(info: Mapping[str, Any]) -> bool:
    """Whether a server's ``SCAN`` goes slot by slot (Valkey 8+, Redis 7.4+), from ``INFO server``."""

    def version(text: object) -> tuple[int, ...]:
        try:
            return tuple(int(part) for part in str(text).split(".")[:2])
        except ValueError:
            return (0,)

    if any(name.endswith("_version") and name not in _KNOWN_VERSIONS for name in info):
        return False
    if "valkey_version" in info:
        return version(info["valkey_version"]) >= (8, 0)
    return info.get("server_name", "redis") == "redis" and version(info.get("redis_version")) >= (7, 4)


class _Layout:
    """Who holds each slot, as each primary says of itself (no gossip, no cache)."""

    def __init__(self, selves: dict[str, _Line], nodes: dict[str, ClusterNode]) -> None:
        self.selves = selves  # node id -> its own line, in the order they were asked
        self.nodes = nodes  # node id -> how to reach it
        self.owner: list[str | None] = [None] * _SLOTS
        self.others: dict[int, list[str]] = {}  # slots two primaries claim (a hand-over under way)
        self.markers: dict[int, list[tuple[str, str, str]]] = {}
        covered = 0
        for node_id, line in selves.items():
            if not line.primary:
                continue
            for low, high in line.ranges:
                span = self.owner[low : high + 1]
                if span.count(None) == len(span):
                    self.owner[low : high + 1] = [node_id] * len(span)
                    covered += len(span)
                    continue
                for slot in range(low, high + 1):
                    if self.owner[slot] is None:
                        self.owner[slot] = node_id
                        covered += 1
                    else:
                        self.others.setdefault(slot, []).append(node_id)
            for slot, kind, peer in line.markers:
                self.markers.setdefault(slot, []).append((node_id, kind, peer))
        #: Slots not simply owned by one primary: migrating, claimed twice, or served by none.
        self.irregular = set(self.others) | set(self.markers)
        if covered < _SLOTS:
            self.irregular.update(slot for slot, owner in enumerate(self.owner) if owner is None)

    def readers(self, slot: int) -> list[str]:
        """The primaries that may hold keys of ``slot``, those keys may leave before those they go to."""
        owner = self.owner[slot]
        owners = [] if owner is None else [owner, *self.others.get(slot, ())]
        sources, targets = [], []
        for node_id, kind, peer in self.markers.get(slot, ()):
            source, target = (node_id, peer) if kind == _MIGRATING else (peer, node_id)
            sources.append(source)
            targets.append(target)
        order: list[str] = []
        for node_id in (*sources, *owners, *targets):
            line = self.selves.get(node_id)
            if line is not None and line.primary and node_id not in order:
                order.append(node_id)
        return order

    def state(self, slot: int) -> tuple[object, ...]:
        """Everything that must stay the same for a read of ``slot`` across a pass to be complete.

        Config epochs are in it: a primary's epoch moves whenever it takes over a
        slot, so a slot that left a node and came back shows up even though its
        owner is the same at both ends.
        """
        owner = self.owner[slot]
        owners = sorted([] if owner is None else [owner, *self.others.get(slot, ())])
        markers = sorted(self.markers.get(slot, ()))
        involved = sorted({*owners, *(m[0] for m in markers), *(m[2] for m in markers)})
        epochs = [
            (node_id, line.epoch, line.primary)
            if (line := self.selves.get(node_id))
            else (node_id, -1, False)
            for node_id in involved
        ]
        return tuple(owners), tuple(markers), tuple(epochs)


class _Plan:
    """Which node reads which slot in one pass, and in which order."""

    def __init__(self, layout: _Layout, pending: set[int] | None) -> None:
        # first[slot]: the node whose read of the slot comes first (None: not read in this pass).
        self.first: list[str | None]
        if pending is None:
            self.first = list(layout.owner)
            todo: Iterable[int] = layout.irregular
            #: A first pass walks every primary that owns slots, for all it reads.
            self.walkers = [
                node_id for node_id, line in layout.selves.items() if line.primary and line.ranges
            ]
        else:
            self.first = [None] * _SLOTS
            todo = pending
            self.walkers = []
        self.later: dict[int, list[str]] = {}  # further readers of a migrating slot, in order
        #: Slots whose read is complete only if the layout after the pass matches the one before.
        self.bracket: set[int] = set()
        self.unserved: set[int] = set()
        for slot in todo:
            order = layout.readers(slot)
            self.first[slot] = order[0] if order else None
            if len(order) > 1:
                self.later[slot] = order[1:]
            if slot in layout.irregular:
                self.bracket.add(slot)
            if not order:
                self.unserved.add(slot)

    def mask(self, layout: _Layout, node_id: str) -> bytearray:
        """One byte per slot: whether a first-pass walk of ``node_id`` reads it."""
        mask = bytearray(_SLOTS)
        for low, high in layout.selves[node_id].ranges:
            mask[low : high + 1] = b"\x01" * (high - low + 1)
        for slot in self.bracket:
            mask[slot] = self.first[slot] == node_id
        return mask

    def groups(self, phase: int, pending: set[int] | None) -> dict[str, list[int]]:
        """Node id -> the slots it reads in ``phase``, besides the walkers' reads."""
        groups: dict[str, list[int]] = {}
        if phase == 0:
            for slot in sorted(self.bracket if pending is None else pending):
                node_id = self.first[slot]
                if node_id is not None and node_id not in self.walkers:
                    groups.setdefault(node_id, []).append(slot)
        else:
            for slot, readers in sorted(self.later.items()):
                if len(readers) >= phase:
                    groups.setdefault(readers[phase - 1], []).append(slot)
        return groups


# -- the scan -----------------------------------------------------------------------------


class _ClusterScan:
    def __init__(
        self,
        cluster: RedisCluster,
        run: Run,
        prefix: bytes,
        pattern: bytes,
        count: int,
        slot_ordered: bool | None,
    ) -> None:
        self._cluster = cluster
        self._run = run
        self._prefix = prefix
        self._pattern = pattern
        self._count = count
        self._forced = slot_ordered
        self._ordered: dict[str, bool] = {}  # node name -> SCAN goes slot by slot
        # Keys yielded, by slot, for slots whose keys could still come back.
        self._seen: dict[int, set[bytes]] = {}
        # Slots whose read in this pass cannot be trusted (the node changed under it).
        self._disturbed: set[int] = set()
        self._asked: set[str] = set()  # the primaries redis-py listed for the last snapshot
        self._relearned = False  # a node was lost, and the layout read again since
        self._resends = 0  # round trips sent again after a lost connection

    async def pages(self, max_passes: int) -> AsyncIterator[list[bytes]]:
        """The keys, a page at a time (pages, not keys, keep the nested generators cheap)."""
        layout = await self._first_snapshot()
        pending: set[int] | None = None  # None: every slot
        unserved: set[int] = set()
        for attempt in range(max_passes):
            if attempt:
                await asyncio.sleep(min(_PAUSE * 2 ** (attempt - 1), _PAUSE_MAX))
                layout = await self._snapshot()
            plan = _Plan(layout, pending)
            self._disturbed = set()
            async for page in self._pass(layout, plan, pending):
                yield page
            pending = set(self._disturbed)
            if plan.bracket - self._disturbed:
                after = await self._snapshot()
                for slot in plan.bracket:
                    if slot in plan.unserved or layout.state(slot) != after.state(slot):
                        pending.add(slot)
            for slot in [slot for slot in self._seen if slot not in pending]:
                del self._seen[slot]
            if not pending:
                return
            if pending <= plan.unserved and pending <= unserved:
                break  # served by no primary, twice in a row: no hand-over, a slot nobody serves
            unserved = plan.unserved
            _log.debug(
                "SCAN pass %d: %s moved or moving; reading them again", attempt + 1, _slot_list(pending)
            )
        pending = pending or set()
        if pending <= plan.unserved:
            verb = "is" if len(pending) == 1 else "are"
            raise BackendUnavailableError(
                f"SCAN: {_slot_list(pending)} {verb} served by no primary (is a primary down?)"
            )
        raise BackendError(
            f"SCAN: the cluster's slot layout kept changing while listing keys: {_slot_list(pending)} "
            f"still moving after {max_passes} passes; try again"
        )

    async def _pass(
        self, layout: _Layout, plan: _Plan, pending: set[int] | None
    ) -> AsyncIterator[list[bytes]]:
        phases = 1 + max((len(rest) for rest in plan.later.values()), default=0)
        for phase in range(phases):
            if phase == 0:
                for node_id in plan.walkers:
                    async for page in self._walk(layout, node_id, plan.mask(layout, node_id), plan.bracket):
                        yield page
            for node_id, slots in plan.groups(phase, pending).items():
                if len(slots) <= _GETKEYS_MAX_SLOTS:
                    async for page in self._getkeys(layout, node_id, slots, plan.bracket):
                        yield page
                else:
                    mask = bytearray(_SLOTS)
                    for slot in slots:
                        mask[slot] = 1
                    async for page in self._walk(layout, node_id, mask, plan.bracket, start=slots[0]):
                        yield page

    def _settle(self, mask: bytearray, bracket: set[int], below: int) -> None:
        """Forget the keys of slots whose read by a walk is complete: they cannot come back."""
        disturbed = self._disturbed
        done = [s for s in self._seen if s < below and mask[s] and s not in bracket and s not in disturbed]
        for slot in done:
            del self._seen[slot]

    async def _walk(
        self,
        layout: _Layout,
        node_id: str,
        mask: bytearray,
        bracket: set[int],
        *,
        start: int = 0,
    ) -> AsyncIterator[list[bytes]]:
        """``SCAN`` one node for keys of the slots set in ``mask``, checking the node after each page.

        ``start``: the lowest slot in ``mask``; a slot-ordered walk begins there.
        """
        node = layout.nodes[node_id]
        planned = layout.selves[node_id]
        ordered = self._ordered.get(node.name, False) if self._forced is None else self._forced
        disturbed = self._disturbed
        seen = self._seen
        # Slot-ordered, every slot below `sealed` was read in full while the node held
        # it still; and a cursor naming a slot with no position in it starts there.
        sealed = cursor = start if ordered else 0
        last = mask.rfind(1)  # the highest slot wanted
        base: _Line | None = None
        run_id: str | None = None
        while True:
            commands: list[tuple[Any, ...]] = [] if base else [("CLUSTER", "NODES")]
            commands += [
                ("SCAN", cursor, "MATCH", self._pattern, "COUNT", self._count),
                ("CLUSTER", "NODES"),
                ("INFO", "server"),
            ]
            resends = self._resends
            replies = await self._send(node, commands, "SCAN", optional=len(commands) - 1)
            page_run_id = _run_id(replies[-1])
            if base is None:
                base = _myself(replies[0])
                if base.node_id != node_id or not base.primary:
                    disturbed.update(slot for slot in range(_SLOTS) if mask[slot])
                    return
                # The layout was read a moment ago: what changed since is set aside.
                disturbed.update(slot for slot in _moved(planned, base) if mask[slot])
                run_id = page_run_id
            elif (page_run_id != run_id) if run_id and page_run_id else (self._resends != resends):
                # A restarted node (same id, epoch and slots) hashes keys with a new seed,
                # so the cursor skips and repeats keys there without an error. Where INFO
                # is refused, a connection lost and opened again may have led to one.
                _log.debug("SCAN on %s: the node may have restarted; reading its slots left again", node.name)
                disturbed.update(slot for slot in range(sealed, _SLOTS) if mask[slot])
                return
            cursor, keys = replies[-3]
            now = _myself(replies[-2])
            if now.epoch != base.epoch or now.node_id != base.node_id or not now.primary:
                # It took over a slot, or failed over: a slot not yet sealed may have
                # left and come back. The next pass reads them again.
                disturbed.update(slot for slot in range(sealed, _SLOTS) if mask[slot])
                return
            disturbed.update(slot for slot in _moved(base, now) if slot >= sealed and mask[slot])
            floor = sealed if ordered else -1
            # Slot-ordered, the slots below `done` end with this page: unless a later
            # pass reads them again, their keys need not be remembered at all.
            done = (int(cursor) & _SLOT_BITS if cursor else _SLOTS) if ordered else 0
            page = []
            for key in keys:
                # key_slot(), with the common case (no "{") inline: most of the cost per key.
                slot = key_slot(key) if 0x7B in key else crc_hqx(key, 0) & _SLOT_BITS
                if slot < floor:
                    raise BackendError(
                        f"SCAN on {node.name} returned a key of slot {slot} after moving past it: "
                        "its SCAN does not go slot by slot as Valkey 8 and Redis 7.4 do"
                    )
                if not mask[slot] or slot in disturbed:
                    continue
                known = seen.get(slot)
                if known is not None:
                    if key in known:
                        continue  # SCAN returns a key twice when the table is resized under it
                    known.add(key)
                elif slot >= done or slot in bracket:
                    seen[slot] = {key}
                page.append(key)
            if page:
                yield page
            if cursor == 0:
                break
            if ordered:
                sealed = done
                self._settle(mask, bracket, sealed)
                if sealed > last:
                    break  # every slot wanted is read: the rest of the node holds none of them
        self._settle(mask, bracket, _SLOTS)

    async def _getkeys(
        self, layout: _Layout, node_id: str, slots: list[int], bracket: set[int]
    ) -> AsyncIterator[list[bytes]]:
        """Read whole slots from one node with ``CLUSTER GETKEYSINSLOT``, checking the node around it."""
        node = layout.nodes[node_id]
        planned = layout.selves[node_id]
        disturbed = self._disturbed
        seen = self._seen
        todo = [slot for slot in slots if slot not in disturbed]
        if not todo:
            return
        commands: list[tuple[Any, ...]] = [("CLUSTER", "NODES")]
        # "CLUSTER", "GETKEYSINSLOT" as two words: redis-py's reply callback for the
        # command would decode the keys (so would one for "CLUSTER NODES", parsing it).
        commands += [("CLUSTER", "GETKEYSINSLOT", slot, _GETKEYS_COUNT) for slot in todo]
        commands.append(("CLUSTER", "NODES"))
        replies = await self._send(node, commands, "CLUSTER GETKEYSINSLOT")
        before, after = _myself(replies[0]), _myself(replies[-1])
        steady = (
            before.node_id == after.node_id == node_id
            and before.primary
            and after.primary
            and before.epoch == after.epoch
        )
        crowded = []
        page = []
        for slot, keys in zip(todo, replies[1:-1], strict=True):
            # Part of a migration, the node must be as the layout had it; otherwise it
            # must own the slot with no migration under way (so it holds all its keys).
            expected = planned.view(slot) if slot in bracket else (True, frozenset())
            if not (steady and before.view(slot) == expected == after.view(slot)):
                disturbed.add(slot)
                continue
            if len(keys) >= _GETKEYS_COUNT:
                crowded.append(slot)
                continue
            known = seen.setdefault(slot, set())
            for key in keys:
                if key.startswith(self._prefix) and key not in known:
                    known.add(key)
                    page.append(key)
            if slot not in bracket:
                del seen[slot]
        if page:
            yield page
        if crowded:
            # A slot with more keys than one reply should hold (a hash tag shared by
            # millions, say) is read page by page: a larger GETKEYSINSLOT would build
            # the whole slot in one reply, on the server and here.
            mask = bytearray(_SLOTS)
            for slot in crowded:
                mask[slot] = 1
            async for page in self._walk(layout, node_id, mask, bracket, start=min(crowded)):
                yield page

    async def _send(
        self, node: ClusterNode, commands: list[tuple[Any, ...]], name: str, *, optional: int = -1
    ) -> list[Any]:
        """Send ``commands`` to ``node`` in one round trip, on one connection, in order.

        A failed command raises, except the one at index ``optional``, whose
        error is returned as its reply. Every command here only reads, so a lost
        connection is retried as redis-py retries single commands (its cluster
        pipeline would send a retried command that names no key to another node).
        """
        retries: int = self._cluster.retry.get_retries()
        execute: Callable[[list[PipelineCommand]], Awaitable[Any]] = node.execute_pipeline

        async def call() -> list[Any]:
            attempt = 0
            while True:
                pipeline = [PipelineCommand(i, *args) for i, args in enumerate(commands)]
                try:
                    await execute(pipeline)
                except _LOST as exc:
                    if attempt >= retries:
                        await self._relearn()
                        raise
                    lost: Exception | None = exc
                else:
                    errors = [
                        (i, c.result) for i, c in enumerate(pipeline) if isinstance(c.result, Exception)
                    ]
                    lost = next((error for _, error in errors if isinstance(error, _LOST)), None)
                    if lost is None or attempt >= retries:
                        if lost is not None:
                            await self._relearn()
                        for i, error in errors:
                            if i != optional:
                                raise error
                        return [command.result for command in pipeline]
                _log.debug("%s on %s failed (%s); trying again", name, node.name, lost)
                attempt += 1
                self._resends += 1
                await asyncio.sleep(0.05 * attempt)

        replies: list[Any] = await self._run(name, None, call)
        return replies

    async def _relearn(self) -> None:
        """Read the layout again after a node was lost for good: it may have failed over.

        redis-py reads it once and keeps it; without this, every later scan would
        go on asking the node that is gone rather than the replica that replaced it.
        """
        self._relearned = True
        with contextlib.suppress(Exception):  # the lost node is the news, not this lookup
            await self._cluster.nodes_manager.initialize()

    async def _ask(self, node: ClusterNode) -> list[_Line]:
        """``CLUSTER NODES`` from ``node`` (and, the first time, whether its SCAN is slot-ordered)."""
        learn = self._forced is None and node.name not in self._ordered
        commands: list[tuple[Any, ...]] = [("CLUSTER", "NODES")]
        if learn:
            commands.append(("INFO", "server"))
        replies = await self._send(node, commands, "CLUSTER NODES", optional=1)
        if learn:
            info = replies[1]
            # INFO may be refused (ACL rules often deny it): then assume the slower, safe way.
            self._ordered[node.name] = isinstance(info, Mapping) and _slot_ordered(info)
        return _parse_nodes(replies[0])

    async def _first_snapshot(self) -> _Layout:
        """:meth:`_snapshot`, tried once more if it lost a node and the layout read since has other primaries.

        Nothing has been yielded yet, so starting over costs nothing: after a
        failover, the second try asks the promoted replica.
        """
        try:
            return await self._snapshot()
        except Exception:
            if not self._relearned or self._asked == {node.name for node in self._cluster.get_primaries()}:
                raise
        return await self._snapshot()

    async def _snapshot(self) -> _Layout:
        """Every primary's own line, asked in parallel, following the ones redis-py does not know."""
        # Learns the layout once per client (again after redis-py reset it on a failure).
        initialize: Callable[[], Awaitable[Any]] = self._cluster.initialize
        await self._run("CLUSTER SLOTS", None, initialize)
        primaries: list[ClusterNode] = self._cluster.get_primaries()
        self._asked = {node.name for node in primaries}
        todo = list({node.name: node for node in primaries}.values())
        asked: set[str] = set()
        selves: dict[str, _Line] = {}
        nodes: dict[str, ClusterNode] = {}
        replies: list[list[_Line]] = []
        for _ in range(8):
            if not todo:
                break
            results = await asyncio.gather(*(self._ask(node) for node in todo), return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    raise result
            for node, result in zip(todo, results, strict=True):
                assert not isinstance(result, BaseException)
                asked.add(node.name)
                replies.append(result)
                me = next((line for line in result if "myself" in line.flags), None)
                if me is not None and me.node_id not in selves:
                    selves[me.node_id] = me
                    nodes[me.node_id] = node
            # A primary that claims slots or takes part in a migration, known only through
            # the others (added since redis-py last read the layout): ask it too.
            peers = {peer for line in selves.values() for _, _, peer in line.markers}
            wanted: dict[str, _Line] = {}
            for lines in replies:
                for line in lines:
                    if (
                        line.node_id not in selves
                        and line.host
                        and line.port
                        and not line.flags & _UNREACHABLE
                        and ((line.primary and line.ranges) or line.node_id in peers)
                    ):
                        wanted[line.node_id] = line
            todo = [node for line in wanted.values() if (node := self._node_at(line)).name not in asked]
        return _Layout(selves, nodes)

    def _node_at(self, line: _Line) -> ClusterNode:
        """The client's node object for ``line``'s address."""
        return node_at(self._cluster.nodes_manager, line.host, line.port)


def node_at(manager: NodesManager, host: str, port: int) -> ClusterNode:
    """The client's node object for an address, added to its cache if the layout does not list it.

    The layout lists the nodes that serve slots: one joining the cluster is
    missing until its first slot has moved to it, which is when it is asked.
    """
    host, port = manager.remap_host_port(host, port)
    node: ClusterNode | None = manager.get_node(host=host, port=port)
    if node is None:
        node = ClusterNode(host, port, PRIMARY, **manager.connection_kwargs)
        manager.set_nodes(manager.nodes_cache, {node.name: node})
    return node


def _slot_list(slots: set[int], shown: int = 6) -> str:
    """``"4 hash slots (5-7, 100)"``: how many, and the first few as ranges."""
    ranges: list[tuple[int, int]] = []
    for slot in sorted(slots):
        if ranges and slot == ranges[-1][1] + 1:
            ranges[-1] = (ranges[-1][0], slot)
        else:
            ranges.append((slot, slot))
    parts = [str(low) if low == high else f"{low}-{high}" for low, high in ranges[:shown]]
    more = ", ..." if len(ranges) > shown else ""
    return f"{len(slots)} hash slot{'' if len(slots) == 1 else 's'} ({', '.join(parts)}{more})"
