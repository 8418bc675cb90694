"""Ray session fixture (owned by the loop work): one local Ray per test session.

Invariant: `ray.init` runs at most once per session and `ray.shutdown` always runs; tests that
need Ray ask for `ray_session` and must not call `ray.init` themselves.
"""
import os

import pytest


@pytest.fixture(scope="session")
def ray_session():
    import ray

    # Logical CPUs are over-declared on purpose: actors ask for 0.5 each and mostly wait on I/O.
    ray.init(num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}},
             namespace=f"onerec-test-{os.getpid()}")
    try:
        yield ray
    finally:
        ray.shutdown()
