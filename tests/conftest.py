"""Session-wide fixtures live in plugin modules so that each area owns its own file."""
pytest_plugins = ["tests.fixtures_broker", "tests.fixtures_ray"]
