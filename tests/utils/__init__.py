"""Helpers the tests share (imported as `utils.paths`, `utils.synthetic`, `utils.models`); the
fixtures built on them live in tests/conftest.py."""
