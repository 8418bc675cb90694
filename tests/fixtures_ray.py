"""Ray session fixture (owned by the loop work)."""
