"""PLACEHOLDER (owned by the streaming work): StreamConfig."""
from dataclasses import dataclass


@dataclass
class StreamConfig:
    bootstrap_servers: str = "127.0.0.1:29092"
    namespace: str = "onerec"
