"""Integration: the durable broker option (`stream.broker_storage = "s3://bucket/"`) survives a crash.

A real S3 endpoint (moto's server on loopback) stores the broker's data; the broker is SIGKILLed and
started again on the same bucket, and every acknowledged event reads back, in order, with the
offsets continuing where they were.
"""
import socket
import subprocess
import sys
import time

import pytest

from infra.broker import EmbeddedBroker, free_port
from streaming import schemas
from streaming.client import EventPublisher, read_events
from streaming.config import StreamConfig
from streaming.topics import ensure_topics

pytestmark = pytest.mark.integration


@pytest.fixture
def s3_endpoint(tmp_path):
    port = free_port()
    log = open(tmp_path / "moto.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.fail(f"moto server did not come up:\n{(tmp_path / 'moto.log').read_text()}")
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def test_s3_storage_survives_a_broker_crash(s3_endpoint, tmp_path):
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                 region_name="us-east-1").create_bucket(Bucket="tansu-durable")
    cfg = StreamConfig(bootstrap_servers=f"127.0.0.1:{free_port()}", namespace="durable",
                       broker_storage="s3://tansu-durable/", s3_endpoint=s3_endpoint,
                       s3_access_key_id="test", s3_secret_access_key="test")
    make_broker = lambda: EmbeddedBroker.from_config(cfg, log_path=tmp_path / "tansu.log")  # noqa: E731

    def fb(i):
        return {"request_id": f"r{i}", "user_id": 1, "item_id": i, "ts": 100.0 + i, "play_time_s": 1.5, "dislike": False}

    broker = make_broker().start()
    try:
        ensure_topics(cfg, ("feedback",))
        with EventPublisher(cfg) as pub:
            for i in range(40):
                pub.feedback(fb(i))
            pub.flush()              # acks=all: acknowledged means stored in S3
        broker.kill()                # SIGKILL: no shutdown work
        broker = make_broker().start()
        records = read_events(cfg, "feedback", until=lambda rs: len(rs) >= 40, timeout_s=30)
        assert sorted(schemas.decode_feedback(r.value)["item_id"] for r in records) == list(range(40)), broker.log_text()
        with EventPublisher(cfg) as pub:   # and it keeps going where it was
            for i in range(40, 50):
                pub.feedback(fb(i))
            pub.flush()
        records = read_events(cfg, "feedback", until=lambda rs: len(rs) >= 50, timeout_s=30)
    finally:
        broker.stop()
    assert sorted(schemas.decode_feedback(r.value)["item_id"] for r in records) == list(range(50))
    for partition in range(cfg.partitions):
        offsets = [r.offset for r in records if r.partition == partition]
        assert offsets == list(range(len(offsets))), f"partition {partition} offsets {offsets}"
