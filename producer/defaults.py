"""Every default, name and limit the producer, the worker and the engine must agree on.

The environment variables live in `producer.settings`, the output keys in `producer.layout`.
"""

from __future__ import annotations

from types import MappingProxyType

TASK_NAME = "omni.generate"
QUEUE = "omni"
# Adapter affinity (docs/scheduling.md): an adapter's jobs go to shard queue `omni.a.<shard>`,
# shard = producer.routing.adapter_shard(adapter, SHARDS). Producer and workers must agree on both;
# changing SHARDS moves (nearly) every adapter to another shard, so each is loaded once more.
SHARD_QUEUE_PREFIX = QUEUE + ".a."
SHARDS = 2048
# Adapter affinity's keys in the broker's Redis (worker.fleet holds the rest). Producers route to
# shard queues only while the plan exists (a coordinator writes it with a short expiry), and set
# the news key after sending to shard queues, so the coordinator plans for them within a tick.
FLEET_KEY_PREFIX = "omni:fleet:"
FLEET_PLAN_KEY = FLEET_KEY_PREFIX + "plan"
FLEET_NEWS_KEY = FLEET_KEY_PREFIX + "news"

DEFAULT_BROKER_URL = "redis://localhost:6379/0"
DEFAULT_DATASET = "default"
DEFAULT_PRIORITY = 5
MAX_PRIORITY = 9

# Redis keys the worker keeps beside the broker's own: how often a job was started unfinished.
ATTEMPTS_KEY_PREFIX = "omni:attempts:"
# Redis keys of `omni-batch beat`: RedBeat's own (one hash per schedule, `::schedule`, `::lock`)
# under BEAT_KEY_PREFIX; the claim on each scheduled run (by its dataset) and each schedule's last
# run under the two after it.
BEAT_KEY_PREFIX = "omni:beat:"
BEAT_LOCK_KEY = BEAT_KEY_PREFIX + ":lock"
SCHEDULED_RUN_KEY_PREFIX = "omni:scheduled-run:"
LAST_RUN_KEY_PREFIX = "omni:last-run:"

# Redis transport: ten priority lists per queue (kombu's default is four buckets), served
# strictly highest first. kombu's Redis order is the reverse of a job's: broker 0 is the most
# urgent, so a job's priority p (9 = most urgent) travels as MAX_PRIORITY - p. The worker must
# use these very options, or it would read the lists in another order.
BROKER_PRIORITY_STEPS = tuple(range(MAX_PRIORITY + 1))
# Read-only: kombu mutates the transport options it is given, so users take a copy
# (producer.client.celery_config does).
BROKER_TRANSPORT_OPTIONS = MappingProxyType(
    {
        "priority_steps": list(BROKER_PRIORITY_STEPS),
        "queue_order_strategy": "priority",
        # An unreachable host fails in seconds, not after the OS's minutes-long connect timeout.
        "socket_connect_timeout": 5,
    }
)
SUBMITTED_AT_HEADER = "omni_submitted_at"

# Limits of a job (the schema enforces them; the engine accepts the same seeds).
MAX_NAME_LENGTH = 128
MAX_PROMPT_LENGTH = 2000
MAX_ADAPTER_LENGTH = 256
MAX_ABS_SCALE = 8.0
MAX_SEED = 2**63 - 1
MAX_STEPS = 200
MAX_GUIDANCE_SCALE = 50.0
SIZE_MULTIPLE = 8
MAX_SIZE = 4096
MAX_METADATA_BYTES = 16 * 1024
JOB_ID_HEX_CHARS = 32
