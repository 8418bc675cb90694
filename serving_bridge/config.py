"""ServeConfig: the `[serve]` section - where the HTTP bridge listens, who may call it, and what one request may cost.

Invariant: every value is validated once, in `__post_init__` (idempotent), and a bad value raises
ValueError naming `serve.<field>`. Imports nothing heavy: `onerec.config` composes it for every command.
"""
from __future__ import annotations

from dataclasses import dataclass

SERVE_DTYPES = ("fp32", "bf16", "int8", "fp8")    # = learner.quant.SERVING_DTYPES (not imported: torch is heavy)


@dataclass
class ServeConfig:
    bridge_host: str = "127.0.0.1"
    bridge_port: int = 8311                # 0 = any free port (tests, benchmarks)
    api_token: str | None = None           # bearer token guarding /recommend and /version; None = open (loopback default)
    request_timeout_s: float = 5.0         # one replica call; after it the bridge retries another replica
    # caps on the work a request controls (a 4xx names the cap; the body itself is capped at 1 MiB)
    max_top_k: int = 32                    # items one request may ask for (also <= loop.beam_width)
    max_context_items: int = 4096          # items in a client-sent context, short + long together
    dtype: str = "fp32"                    # what replicas serve each pushed version in (actors/replica.py):
                                           # fp32 | bf16 | int8 (CPUs with AVX-512 BF16 / VNNI) | fp8 (CUDA)

    def __post_init__(self) -> None:
        if not self.bridge_host:
            raise ValueError("serve.bridge_host must not be empty")
        if isinstance(self.bridge_port, bool) or not isinstance(self.bridge_port, int) or not 0 <= self.bridge_port <= 65535:
            raise ValueError(f"serve.bridge_port must be in 0..65535, got {self.bridge_port!r}")
        if not float(self.request_timeout_s) > 0:
            raise ValueError(f"serve.request_timeout_s must be > 0, got {self.request_timeout_s!r}")
        for name in ("max_top_k", "max_context_items"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"serve.{name} must be an integer >= 1, got {value!r}")
        if self.dtype not in SERVE_DTYPES:
            raise ValueError(f"serve.dtype must be one of {', '.join(SERVE_DTYPES)}, got {self.dtype!r}")
        if self.api_token == "":
            self.api_token = None
