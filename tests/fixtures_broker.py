"""Broker session fixture (owned by the streaming work)."""
