"""`onerec topics`: the namespaced, co-partitioned topics, created up front, and their layout version.

Invariant: every topic of one namespace has `StreamConfig.partitions` partitions, and impressions and
feedback are keyed by the user id (the decimal id as ASCII bytes) through Kafka's murmur2 default
partitioner, so a user lands on the same partition number in impressions, feedback and samples (the
one-stage join relies on it). The namespace's `layout` topic holds one record, `LAYOUT`, that says
so; a worker joins only topics whose layout record is this one (`check_layout`), and `ensure_topics`
refuses to add the new layout to a namespace written under another (e.g. layout 1: keyed by
request_id, with a `joined` topic). `ensure_topics` is idempotent and fails loudly when an existing
topic has another partition count.

    topic_name(cfg, "impressions")  -> "onerec.impressions"
"""
from __future__ import annotations

import argparse
import sys
import time
import tomllib

import orjson

from onerec_data import data_path
from streaming.config import StreamConfig

TOPIC_SETTINGS = data_path("topics.toml", package="infra")   # package data of infra/, shipped in the wheel
PUBLIC_TOPICS = ("impressions", "feedback", "samples", "dead-letters")
INTERNAL_TOPICS = ("layout",)
LAYOUT_VERSION = 2
LAYOUT = {"version": LAYOUT_VERSION, "impressions_key": "user_id", "feedback_key": "user_id",
          "samples_key": "user_id", "key_bytes": "decimal user id, ASCII", "partitioner": "murmur2"}
LAYOUT_KEY = b"layout"
OLD_LAYOUT_TOPICS = ("joined",)   # topics only layout 1 (keyed by request_id, two stages) had


class LayoutError(RuntimeError):
    """The namespace's topics were written under another layout (keying) than this code's."""


def topic_name(cfg: StreamConfig, kind: str) -> str:
    """Full topic name of `kind` (impressions, feedback, samples, dead-letters, layout)."""
    if kind not in PUBLIC_TOPICS + INTERNAL_TOPICS:
        raise ValueError(f"unknown topic kind {kind!r} (known: {PUBLIC_TOPICS + INTERNAL_TOPICS})")
    suffix = cfg.dead_letter_suffix if kind == "dead-letters" else kind
    return f"{cfg.namespace}.{suffix}"


def changelog_topic(cfg: StreamConfig, table: str) -> str:
    """Changelog topic of a join Table: Faust's own naming, so both engines share the state."""
    return f"{cfg.app_id}-{table}-changelog"


def topic_settings() -> dict[str, dict[str, str]]:
    """Per kind, the CreateTopics configs of infra/topics.toml."""
    with open(TOPIC_SETTINGS, "rb") as f:
        table = tomllib.load(f)
    missing = [k for k in PUBLIC_TOPICS + INTERNAL_TOPICS if k not in table]
    if missing:
        raise ValueError(f"{TOPIC_SETTINGS}: missing topics {missing}")
    return {kind: {str(k): str(v) for k, v in table[kind].get("configs", {}).items()} for kind in table}


def admin_client(cfg: StreamConfig):
    from kafka import KafkaAdminClient

    return KafkaAdminClient(client_id=f"{cfg.namespace}-admin", request_timeout_ms=15000, **cfg.client_options())


def ensure_topics(cfg: StreamConfig, kinds: tuple[str, ...] = PUBLIC_TOPICS + INTERNAL_TOPICS) -> list[str]:
    """Create the topics of `kinds` that do not exist yet, and the layout record; return all their names.
    Raises LayoutError for a namespace that holds topics of another layout."""
    settings = topic_settings()
    layout = read_layout(cfg)
    if layout is None:
        existing = _existing_topics(cfg)
        written = [topic_name(cfg, k) for k in ("impressions", "feedback")] + [
            f"{cfg.namespace}.{k}" for k in OLD_LAYOUT_TOPICS]
        if any(name in existing for name in written):
            raise LayoutError(_old_layout_message(cfg, None))
    elif layout != LAYOUT:
        raise LayoutError(_old_layout_message(cfg, layout))
    names = _ensure(cfg, {topic_name(cfg, kind): settings.get(kind, {})
                          for kind in dict.fromkeys(kinds + INTERNAL_TOPICS)})
    if layout is None:
        _write_layout(cfg)
    return names


def _old_layout_message(cfg: StreamConfig, layout: dict | None) -> str:
    found = "no layout record (layout 1: keyed by request_id)" if layout is None else f"layout {layout}"
    return (f"the topics of namespace {cfg.namespace!r} were written under {found}; this code joins layout "
            f"{LAYOUT_VERSION} (impressions and feedback keyed by the decimal user id, murmur2). Use a new "
            f"stream.namespace, or delete the old topics (`onerec topics --delete`) and run `onerec topics`.")


def _existing_topics(cfg: StreamConfig) -> set[str]:
    admin = admin_client(cfg)
    try:
        return set(admin.list_topics())
    finally:
        admin.close()


def read_layout(cfg: StreamConfig, timeout_s: float = 5.0) -> dict | None:
    """The namespace's layout record, or None when its layout topic is missing or empty."""
    from kafka import KafkaConsumer, TopicPartition

    name = topic_name(cfg, "layout")
    if name not in _existing_topics(cfg):
        return None
    consumer = KafkaConsumer(**cfg.client_options(), group_id=None, enable_auto_commit=False,
                             auto_offset_reset="earliest")
    try:
        tp = TopicPartition(name, 0)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        end = consumer.end_offsets([tp]).get(tp, 0)
        deadline = time.monotonic() + timeout_s
        while end and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=200).values():
                for r in records:
                    if r.key == LAYOUT_KEY:
                        return orjson.loads(r.value)
        return None
    finally:
        consumer.close()


def _write_layout(cfg: StreamConfig) -> None:
    from kafka import KafkaProducer

    producer = KafkaProducer(**cfg.client_options(), acks="all")
    try:
        producer.send(topic_name(cfg, "layout"), key=LAYOUT_KEY, value=orjson.dumps(LAYOUT), partition=0).get(15)
    finally:
        producer.close(timeout=10)


def check_layout(cfg: StreamConfig) -> None:
    """Raise LayoutError (with the way out) unless the namespace's topics carry this code's layout."""
    layout = read_layout(cfg)
    if layout != LAYOUT:
        if layout is None and topic_name(cfg, "impressions") not in _existing_topics(cfg):
            raise LayoutError(f"namespace {cfg.namespace!r} has no topics yet: run `onerec topics` first")
        raise LayoutError(_old_layout_message(cfg, layout))


def ensure_changelog_topics(cfg: StreamConfig, tables: tuple[str, ...]) -> list[str]:
    """Create the join's changelog topics (compacted) if missing.

    The Faust engine creates its own; the batched engine (streaming/batch_worker.py) calls this.
    """
    return _ensure(cfg, {changelog_topic(cfg, t): {"cleanup.policy": "compact"} for t in tables})


def _ensure(cfg: StreamConfig, configs: dict[str, dict[str, str]]) -> list[str]:
    """Create the missing topics of `configs` (name -> CreateTopics configs) with `stream.partitions`
    partitions, and fail loudly when an existing one has another partition count."""
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = admin_client(cfg)
    try:
        existing = set(admin.list_topics())
        new = [NewTopic(name, cfg.partitions, cfg.replication_factor, topic_configs=topic_configs)
               for name, topic_configs in configs.items() if name not in existing]
        if new:
            try:
                admin.create_topics(new)
            except TopicAlreadyExistsError:
                pass  # another process created them in between: fine, checked below
        for desc in admin.describe_topics(list(configs)):
            n = len(desc["partitions"])
            if desc.get("error_code", 0) != 0 or n != cfg.partitions:
                raise ValueError(f"topic {desc['name']} has {n} partitions (error {desc.get('error_code')}), "
                                 f"stream.partitions is {cfg.partitions}: co-partitioning needs them equal")
    finally:
        admin.close()
    return list(configs)


def delete_topics(cfg: StreamConfig) -> list[str]:
    """Delete this namespace's topics (tests and `onerec topics --delete`)."""
    admin = admin_client(cfg)
    try:
        prefix = f"{cfg.namespace}."
        doomed = [t for t in admin.list_topics() if t.startswith(prefix) or t.startswith(f"{cfg.app_id}-")]
        if doomed:
            admin.delete_topics(doomed)
        return doomed
    finally:
        admin.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--delete", action="store_true", help="delete this namespace's topics instead")


def main(args: argparse.Namespace, cfg) -> int:
    try:
        names = delete_topics(cfg.stream) if args.delete else ensure_topics(cfg.stream)
    except Exception as exc:  # noqa: BLE001 - the CLI reports any client error and exits non-zero
        print(f"onerec topics: {exc}", file=sys.stderr)
        return 1
    verb = "deleted" if args.delete else "ready"
    for name in names:
        print(f"{verb}: {name} ({cfg.stream.partitions} partitions)")
    return 0
