"""`onerec topics`: the namespaced, co-partitioned topics, created up front.

Invariant: every topic of one namespace has `StreamConfig.partitions` partitions, so a request_id
lands on the same partition number in impressions, feedback and ticks (the join relies on it).
`ensure_topics` is idempotent and fails loudly when an existing topic has another partition count.

    topic_name(cfg, "impressions")  -> "onerec.impressions"
"""
from __future__ import annotations

import argparse
import sys
import tomllib

from onerec_data import data_path
from streaming.config import StreamConfig

TOPIC_SETTINGS = data_path("topics.toml", package="infra")   # package data of infra/, shipped in the wheel
PUBLIC_TOPICS = ("impressions", "feedback", "samples", "dead-letters")
INTERNAL_TOPICS = ("joined", "ticks")


def topic_name(cfg: StreamConfig, kind: str) -> str:
    """Full topic name of `kind` (impressions, feedback, samples, dead-letters, joined, ticks)."""
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
    """Create the topics of `kinds` that do not exist yet; return all their names."""
    settings = topic_settings()
    return _ensure(cfg, {topic_name(cfg, kind): settings.get(kind, {}) for kind in kinds})


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
