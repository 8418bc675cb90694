"""Session-wide fixtures live in plugin modules so that each area owns its own file.

OpenMP threads that spin while waiting make small ops many times slower when the broker, Ray
actors and the Faust worker share two cores with the test process (measured on the model tests),
so threads sleep while they wait. This must be set before torch is first imported.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

pytest_plugins = ["tests.fixtures_broker", "tests.fixtures_ray", "tests.fixtures_hygiene"]
