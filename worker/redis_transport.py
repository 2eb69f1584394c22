"""kombu's Redis transport with three changes that keep every accepted job: take, lease, file.

1. **Take and record in one step.** kombu (5.7) takes a message with `BRPOP`, which removes it
   from the list at once, and records it as reserved (`unacked`, `unacked_index`) only in a later
   round trip. A worker killed, or a Redis that dies, in between loses the message for good, and
   the worker keeps a BRPOP outstanding while its timers run (a whole generation), so the gap is
   wide. Here a Lua script pops and records in one server-side step, in kombu's own format, so
   kombu's restore and visibility sweep work unchanged. A script cannot block, so the worker
   polls: at once while messages keep coming, every `POLL_INTERVAL_S` once the lists are empty.
   Nothing is ever outstanding: the worker holds only what it has read.
2. **Leases** (`worker.leases`): every held message is renewed on a thread of its own, so a short
   visibility timeout returns a dead worker's jobs quickly and never a live worker's.
2b. **Take order** (`worker.stealing.take_order`): with several queues (a worker following adapter
   affinity consumes its shards' queues besides `omni`), the queue taken from last is taken from
   first, so a window fills from one shard before the next, and a queue whose oldest job has
   waited `steal_after_s` goes before all. kombu's cycle does the opposite (the queue just taken
   from goes last), and a window refilled a few slots at a time then meets many adapters.
3. **Unprioritised messages at the default priority.** kombu files a message sent without a
   priority as priority 0, which is the most urgent list in Redis order. A message taken from that
   list whose job does not ask for the most urgent priority is filed again, in the same step as
   its record is removed, under the priority its job asks for (5 when it names none).

And one fix so a worker survives Redis itself dying: when Redis goes away while the worker holds
reserved jobs, kombu tries to put them back through a connection that no longer exists (an
AttributeError Celery does not expect, and the worker dies). Here that is logged; the jobs are
still in `unacked` and come back after the visibility timeout, since no one renews them.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Mapping
from time import monotonic, time
from typing import Any, TypeVar

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

from producer.broker import BrokerKind, broker_priority
from producer.defaults import BROKER_PRIORITY_STEPS, DEFAULT_PRIORITY, MAX_PRIORITY, SUBMITTED_AT_HEADER
from worker.affinity import AffinityPolicy
from worker.leases import LeaseKeeper
from worker.stealing import take_order

logger = logging.getLogger("omni.worker")

# How often an idle worker looks at empty lists again: the most a new job waits to be taken.
POLL_INTERVAL_S = 0.1
# Messages one take may return, and takes in one turn of the event loop, so a deep queue cannot
# hold up the worker's timers.
MAX_TAKE = 128
MAX_TAKE_ROUNDS = 8
# How often a worker with several queues reads how long each queue's oldest job has waited.
HEAD_AGES_S = 1.0
_TAKE_POLICY = AffinityPolicy()
K = TypeVar("K")

# KEYS: unacked, unacked_index, then the lists in the order they are served.
# ARGV: now, the most messages to take, then for each list (ARGV[i] goes with KEYS[i]) '1' to
# record its messages as reserved (consumers that ack) or '0' (consumers that do not).
# Returns (list, message, recorded) triples. A message that is not kombu's JSON envelope is
# returned unrecorded, for the worker to drop: an error here would lose the pop it follows.
TAKE_SCRIPT = """
local taken = {}
local wanted = tonumber(ARGV[2])
local n = 0
for i = 3, #KEYS do
  while n < wanted do
    local item = redis.call('RPOP', KEYS[i])
    if not item then break end
    local recorded = 0
    if ARGV[i] == '1' then
      local ok, message = pcall(cjson.decode, item)
      local props = ok and type(message) == 'table' and message['properties']
      local info = type(props) == 'table' and props['delivery_info']
      local tag = type(props) == 'table' and props['delivery_tag']
      if type(info) == 'table' and type(tag) == 'string' then
        local entry = '[' .. item .. ',' .. cjson.encode(info['exchange'] or '') .. ','
          .. cjson.encode(info['routing_key'] or '') .. ']'
        redis.call('HSET', KEYS[1], tag, entry)
        redis.call('ZADD', KEYS[2], ARGV[1], tag)
        recorded = 1
      end
    end
    taken[#taken + 1] = KEYS[i]
    taken[#taken + 1] = item
    taken[#taken + 1] = recorded
    n = n + 1
  end
end
return taken
"""


def priority_list_key(queue: str, priority: int) -> str:
    """The Redis list kombu keeps a queue's messages of one broker priority in (0: the bare name)."""
    return queue if priority == 0 else f"{queue}{kombu_redis.Channel.sep}{priority}"


def submitted_at(item: bytes | str | None) -> float | None:
    """When a queued kombu message was sent (its producer's header, wall clock), if it says."""
    if item is None:
        return None
    try:
        sent = loads(bytes_to_str(item))["headers"][SUBMITTED_AT_HEADER]
    except (KeyError, TypeError, ValueError):
        return None
    return sent if isinstance(sent, float) else None


def oldest_waits(client: redis.Redis, queues: Mapping[K, str]) -> dict[K, float]:
    """How long each queue's oldest job has waited (its submission header), in one round trip.

    A queue's lists are read at every broker priority; queues whose jobs carry no header are left out.
    """
    keys = [
        (name, priority_list_key(queue, p)) for name, queue in queues.items() for p in BROKER_PRIORITY_STEPS
    ]
    if not keys:
        return {}
    with client.pipeline(transaction=False) as pipe:
        for _, key in keys:
            pipe.lindex(key, -1)
        heads = pipe.execute()
    now, ages = time(), {}
    for (name, _), item in zip(keys, heads, strict=True):
        sent = submitted_at(item)
        if sent is not None:
            ages[name] = max(ages.get(name, 0.0), now - sent)
    return ages


def job_broker_priority(payload: dict[str, Any]) -> int | None:
    """The broker priority an `omni.generate` message's job asks for; None if it is no job."""
    try:
        body = payload["body"]
        if payload["properties"].get("body_encoding") == "base64":
            body = base64.b64decode(body)
        decoded = json.loads(body)
        # Celery's protocol 2 body is [args, kwargs, embed]; protocol 1 is a dict with `args`.
        args = decoded[0] if isinstance(decoded, list) else decoded["args"]
        job = args[0]
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    priority = job.get("priority", DEFAULT_PRIORITY) if isinstance(job, dict) else None
    if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= MAX_PRIORITY:
        return None  # not a job's priority: the worker refuses the job on receipt, naming the field
    return broker_priority(priority, BrokerKind.REDIS)


# The broker transport option that carries the worker's OMNI_STUCK_AFTER to its leases.
STUCK_AFTER_OPTION = "omni_stuck_after"


class QoS(kombu_redis.QoS):
    """kombu's reservations, recorded by the take itself, and leased while held."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        stuck_after_s = self.channel.connection.client.transport_options.get(STUCK_AFTER_OPTION, 0)
        self.leases = LeaseKeeper(
            self.channel.lease_client,
            self.unacked_index_key,
            timeout_s=self.visibility_timeout,
            stuck_after_s=stuck_after_s,
        )

    def append(self, message: Any, delivery_tag: str) -> None:
        if delivery_tag in self.channel.taken:
            self.channel.taken.discard(delivery_tag)
            virtual.QoS.append(self, message, delivery_tag)  # Redis has its record from the take
        else:
            super().append(message, delivery_tag)
        self.leases.hold(delivery_tag)

    def ack(self, delivery_tag: str) -> None:
        self.leases.release(delivery_tag)
        super().ack(delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        self.leases.release(delivery_tag)
        super().reject(delivery_tag, requeue=requeue)

    def restore_unacked(self, client=None):
        self.leases.release_all()
        try:
            return super().restore_unacked(client)
        except (AttributeError, *self.channel.connection_errors) as e:
            logger.warning(
                "could not return %d reserved job(s) to the queue (%s: %s); "
                "Redis redelivers them after the visibility timeout",
                len(self._delivered),
                type(e).__name__,
                e,
            )
            return None


class Channel(kombu_redis.Channel):
    QoS = QoS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.global_keyprefix:
            raise ValueError("omni-batch's Redis transport does not support the global_keyprefix option")
        # Tags the take recorded in Redis, until kombu's consumer appends them to the QoS.
        self.taken: set[str] = set()
        self._no_ack_queues: set[str] = set()
        self._next_take = 0.0
        self._take = self._create_client().register_script(TAKE_SCRIPT)
        self._last_taken: dict[str, float] = {}
        self._head_ages: dict[str, float] = {}
        self._head_ages_due = 0.0

    def lease_client(self) -> redis.Redis:
        """A client on a connection pool of its own, for the lease thread."""
        return redis.Redis(connection_pool=self._get_pool())

    def basic_consume(self, queue: str, no_ack: bool, *args: Any, **kwargs: Any) -> Any:
        (self._no_ack_queues.add if no_ack else self._no_ack_queues.discard)(queue)
        return super().basic_consume(queue, no_ack, *args, **kwargs)

    def take_due(self) -> int:
        """Take what the prefetch window has room for, unless the lists were empty a moment ago."""
        total = 0
        for _ in range(MAX_TAKE_ROUNDS):
            if monotonic() < self._next_take or not self.active_queues or not self.qos.can_consume():
                break
            asked = min(self.qos.can_consume_max_estimate() or MAX_TAKE, MAX_TAKE)
            took = self.take(asked)
            total += took
            if took < asked:  # the lists are empty now
                self._next_take = monotonic() + POLL_INTERVAL_S
        return total

    def take(self, count: int) -> int:
        """Pop up to `count` messages, highest priority first, recorded as reserved; deliver them."""
        queues = self._queue_cycle.consume(len(self.active_queues))
        if len(queues) > 1:
            queues = take_order(
                queues, last_taken=self._last_taken, waited=self._waited(queues), policy=_TAKE_POLICY
            )
        lists = [(self._q_for_pri(queue, pri), queue) for pri in self.priority_steps for queue in queues]
        record = ["0" if queue in self._no_ack_queues else "1" for _, queue in lists]
        with self.conn_or_acquire() as client:
            reply = self._take(
                keys=[self.unacked_key, self.unacked_index_key, *(key for key, _ in lists)],
                args=[time(), count, *record],
                client=client,
            )
        messages = []
        for i in range(0, len(reply), 3):
            key, item = bytes_to_str(reply[i]), bytes_to_str(reply[i + 1])
            try:
                payload = loads(item)
                tag = payload["properties"]["delivery_tag"]
            except (KeyError, TypeError, ValueError):
                payload = tag = None
            messages.append((key, item, payload, tag if reply[i + 2] else None))
        # Leased from now: delivering one may run a group, and the others must not lapse meanwhile.
        leased = [tag for *_, tag in messages if tag is not None]
        for tag in leased:
            self.qos.leases.hold(tag)
        try:
            for message in messages:
                self._deliver_taken(*message)
        finally:
            # Filed again, or never handed to the consumer: not held, so not renewed.
            for tag in leased:
                if tag not in self.qos._delivered:
                    self.qos.leases.release(tag)
                    self.taken.discard(tag)
        return len(messages)

    def _waited(self, queues: list[str]) -> dict[str, float]:
        """How long each queue's oldest job has waited, read at most once a second."""
        if monotonic() >= self._head_ages_due:
            with self.conn_or_acquire() as client:
                self._head_ages = oldest_waits(client, {queue: queue for queue in queues})
            self._head_ages_due = monotonic() + HEAD_AGES_S
        return self._head_ages

    def _deliver_taken(self, key: str, item: str, payload: dict[str, Any] | None, tag: str | None) -> None:
        """Hand one message to its consumer; `tag` is None unless the take recorded it as reserved."""
        queue = key.rsplit(self.sep, 1)[0] if self.sep in key else key
        if payload is None or (tag is None and queue not in self._no_ack_queues):
            logger.error("dropped a message from %r that is not a kombu message: %.200s", key, item)
            return
        self._queue_cycle.rotate(queue)
        self._last_taken[queue] = monotonic()
        if tag is not None and key == self._q_for_pri(queue, self.priority_steps[0]):
            wanted = job_broker_priority(payload)
            if wanted is not None and self._q_for_pri(queue, wanted) != key:
                self._refile(queue, payload, tag, wanted)
                return
        if tag is not None:
            self.taken.add(tag)
        self.connection._deliver(payload, queue)

    def _refile(self, queue: str, payload: dict[str, Any], tag: str, priority: int) -> None:
        """File a reserved message again at `priority`, at the back of its list, in one transaction."""
        payload["properties"]["priority"] = priority
        with self.conn_or_acquire() as client, client.pipeline() as pipe:
            pipe.hdel(self.unacked_key, tag).zrem(self.unacked_index_key, tag)
            pipe.lpush(self._q_for_pri(queue, priority), dumps(payload))
            pipe.execute()
        logger.debug("message %s filed again at broker priority %d, as its job asks", tag, priority)

    def close(self) -> None:
        if self._qos is not None:
            self._qos.leases.stop()
        super().close()


class Poller(kombu_redis.MultiChannelPoller):
    """kombu's poller, taking with the script instead of keeping a BRPOP outstanding."""

    closed = False

    def on_poll_start(self) -> None:
        for channel in list(self._channels):
            channel.take_due()
            if channel.active_fanout_queues:  # broadcast (remote control) stays kombu's pub/sub
                self._register_LISTEN(channel)

    def get(self, callback: Any, timeout: float | None = None) -> None:
        """Without an event loop (kombu's `drain_events`): take now, or wait a poll interval."""
        if sum(channel.take_due() for channel in list(self._channels)):
            return
        wait = POLL_INTERVAL_S if timeout is None else min(timeout, POLL_INTERVAL_S)
        super().get(callback, timeout=wait)

    def close(self) -> None:
        self.closed = True
        super().close()


class Transport(kombu_redis.Transport):
    Channel = Channel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cycle = Poller()

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        super().register_with_event_loop(connection, loop)
        cycle = self.cycle

        def poll() -> None:
            # Wakes the loop to take when nothing else does; ends with its connection.
            if cycle.closed:
                timer.cancel()
            else:
                cycle.on_poll_start()

        timer = loop.call_repeatedly(POLL_INTERVAL_S, poll)
