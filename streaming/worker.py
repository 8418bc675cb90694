"""`onerec worker`: the join worker - impressions + feedback (keyed by user id) in, samples and dead letters out.

Two engines run the same state machines (streaming/join.py) on the same topics, consumer group and
changelogs, so either can take over from the other:
  - "batched" (default, streaming/batch_worker.py): aiokafka `getmany` batches straight into the join;
  - "faust" (streaming/app.py): Faust agents and Tables, the reference engine.

    onerec worker
    onerec worker --set stream.engine='"faust"' --loglevel info
    python -m onerec.cli worker --set stream.namespace=test1
"""
from __future__ import annotations

import argparse
import logging
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--loglevel", default="warning", help="log level (info shows the join stats)")
    parser.add_argument("--no-create-topics", action="store_true", help="do not create the topics first")


def main(args: argparse.Namespace, cfg) -> int:
    from streaming.topics import LayoutError

    create = not args.no_create_topics
    try:
        if cfg.stream.engine == "faust":
            from streaming.app import run_worker

            return run_worker(cfg.stream, loglevel=args.loglevel, create_topics=create)
        from streaming.batch_worker import run_worker

        logging.basicConfig(level=args.loglevel.upper(), format="[%(asctime)s] %(name)s %(levelname)s: %(message)s")
        return run_worker(cfg.stream, create_topics=create)
    except LayoutError as exc:
        print(f"onerec worker: refusing to join: {exc}", file=sys.stderr)
        return 2
