"""Broker session fixture (owned by the streaming work): one real Tansu broker per test session.

Invariant: `broker` yields a bootstrap address only once the broker answers a metadata request; if
it never comes up the test fails with the broker's log (an unreachable broker is a failure, never a
skip); the process is stopped in `finally`. Tests isolate themselves with `stream_namespace` (a fresh
topic namespace and Faust app id per test) instead of sharing topics.
"""
import itertools
import os

import pytest

_counter = itertools.count()


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    from infra.broker import BrokerError, EmbeddedBroker, free_port

    log_path = tmp_path_factory.mktemp("broker") / "tansu.log"
    embedded = EmbeddedBroker(port=free_port(), storage="memory://tansu/", log_path=log_path)
    try:
        embedded.start(timeout_s=30)
    except BrokerError as exc:
        pytest.fail(f"embedded broker did not come up: {exc}", pytrace=False)
    try:
        yield embedded.bootstrap
    finally:
        embedded.stop()


@pytest.fixture
def stream_namespace(request) -> str:
    """A topic namespace no other test uses (also makes the Faust app id unique)."""
    name = request.node.name.replace("[", "-").replace("]", "").replace("_", "-")[:40]
    return f"t{os.getpid()}-{next(_counter)}-{name}"


@pytest.fixture
def stream_config(broker, stream_namespace):
    """A StreamConfig on the session broker with test-friendly timings (short sessions, quick ticks)."""
    from streaming.config import StreamConfig

    return StreamConfig(bootstrap_servers=broker, namespace=stream_namespace, partitions=2,
                        session_timeout_ms=2000, feedback_window_s=30.0, idle_close_s=2.0,
                        tick_interval_s=0.25, batch_within_s=0.02)
