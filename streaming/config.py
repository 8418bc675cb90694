"""StreamConfig: the `[stream]` section - broker, topics, the Faust join and its reward shaping.

Invariant: `__post_init__` validates and is idempotent (onerec.config calls it again after every
override); a bad value raises ValueError naming `stream.<field>`. Every client (kafka-python,
aiokafka, Faust) gets its connection settings from `client_options()` / `faust_broker_options()`,
so a real Apache Kafka cluster with SASL/SSL works by configuration alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

ENGINES = ("batched", "faust")
SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "GSSAPI", "OAUTHBEARER")


@dataclass
class StreamConfig:
    # --- cluster
    bootstrap_servers: str = "127.0.0.1:29092"   # outside Ray's worker ports 10002-19999
    namespace: str = "onerec"                    # topic prefix: several deployments share a cluster
    partitions: int = 2                          # every topic (co-partitioned, keyed by user_id)
    replication_factor: int = 1                  # 1 for the embedded broker; 3 on a real cluster
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    # --- the join (event time, seconds)
    feedback_window_s: float = 30.0              # feedback later than impression ts + this is late
    idle_close_s: float | None = None            # wall seconds after arrival that close a window on an
                                                 # idle stream; None = feedback_window_s
    duration_beta: float = 2.0                   # log base of duration buckets F(d) (section 3.1.1)
    history_len: int = 200                       # per-user (bucket, play time) history kept for q
    closed_retention_s: float = 600.0            # event seconds a closed request id is remembered
    dead_letter_suffix: str = "dead-letters"
    # --- Faust
    engine: str = "batched"                      # join engine: "batched" (streaming/batch_worker.py) or
                                                 # "faust" (streaming/app.py, the reference); same topics
    faust_app_id: str = "join"                   # full id is f"{namespace}-{faust_app_id}"
    faust_store: str = "memory://"               # rocksdb:// needs python-rocksdb (not installed)
    session_timeout_ms: int = 10_000             # the embedded broker completes a join after half of it
    batch_max: int = 2000                        # events per agent batch (one ack round-trip each)
    batch_within_s: float = 0.05                 # ... or this long, whichever first
    tick_interval_s: float = 1.0                 # wall-clock ticks that close windows on idle streams
    # --- embedded broker (infra/broker.py)
    broker_storage: str = "memory://tansu/"      # or "s3://bucket/" for the durable option
    s3_endpoint: str | None = None               # e.g. http://127.0.0.1:9000 (MinIO, moto); None = AWS
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = None          # None: taken from the environment
    s3_secret_access_key: str | None = None
    s3_allow_http: bool = True

    def __post_init__(self) -> None:
        if not self.bootstrap_servers or not all(":" in s for s in self.servers()):
            raise ValueError(f"stream.bootstrap_servers must be host:port[,host:port], got {self.bootstrap_servers!r}")
        if not self.namespace or any(c in self.namespace for c in " /\\:"):
            raise ValueError(f"stream.namespace must be a non-empty name without spaces, '/', ':', got {self.namespace!r}")
        for name in ("partitions", "replication_factor", "history_len", "batch_max",
                     "session_timeout_ms"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"stream.{name} must be an integer >= 1, got {value!r}")
        for name in ("feedback_window_s", "batch_within_s", "tick_interval_s", "closed_retention_s"):
            value = float(getattr(self, name))
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"stream.{name} must be > 0, got {getattr(self, name)!r}")
        if self.idle_close_s is not None and not float(self.idle_close_s) > 0:
            raise ValueError(f"stream.idle_close_s must be > 0 or unset, got {self.idle_close_s!r}")
        if not float(self.duration_beta) > 1:
            raise ValueError(f"stream.duration_beta must be > 1, got {self.duration_beta!r}")
        if self.security_protocol not in SECURITY_PROTOCOLS:
            raise ValueError(f"stream.security_protocol must be one of {SECURITY_PROTOCOLS}, got {self.security_protocol!r}")
        if self.sasl_mechanism is not None and self.sasl_mechanism not in SASL_MECHANISMS:
            raise ValueError(f"stream.sasl_mechanism must be one of {SASL_MECHANISMS}, got {self.sasl_mechanism!r}")
        if self.security_protocol.startswith("SASL") and self.sasl_mechanism is None:
            raise ValueError(f"stream.sasl_mechanism is required with security_protocol={self.security_protocol}")
        if not self.broker_storage.startswith(("memory://", "s3://")):
            raise ValueError(f"stream.broker_storage must start with memory:// or s3://, got {self.broker_storage!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"stream.engine must be one of {ENGINES}, got {self.engine!r}")
        if not self.faust_store.startswith(("memory://", "rocksdb://")):
            raise ValueError(f"stream.faust_store must be memory:// or rocksdb://, got {self.faust_store!r}")
        if not self.faust_app_id or not self.dead_letter_suffix:
            raise ValueError("stream.faust_app_id and stream.dead_letter_suffix must not be empty")

    # --- derived values
    def servers(self) -> list[str]:
        return [s.strip() for s in self.bootstrap_servers.split(",") if s.strip()]

    @property
    def idle_close(self) -> float:
        return float(self.idle_close_s if self.idle_close_s is not None else self.feedback_window_s)

    @property
    def app_id(self) -> str:
        """Faust application id (consumer group, changelog topic prefix), namespaced."""
        return f"{self.namespace}-{self.faust_app_id}"

    def client_options(self) -> dict:
        """Connection keyword arguments shared by kafka-python and aiokafka clients."""
        opts: dict = {"bootstrap_servers": self.servers(), "security_protocol": self.security_protocol}
        if self.sasl_mechanism is not None:
            opts["sasl_mechanism"] = self.sasl_mechanism
            opts["sasl_plain_username"] = self.sasl_username
            opts["sasl_plain_password"] = self.sasl_password
        if self.security_protocol in ("SSL", "SASL_SSL"):
            opts["ssl_context"] = self.ssl_context()
        return opts

    def ssl_context(self):
        import ssl

        ctx = ssl.create_default_context(cafile=self.ssl_cafile)
        if self.ssl_certfile:
            ctx.load_cert_chain(self.ssl_certfile, self.ssl_keyfile)
        return ctx
