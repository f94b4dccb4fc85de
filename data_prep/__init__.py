"""Dataset conversion scripts (importable so tests can call them)."""
