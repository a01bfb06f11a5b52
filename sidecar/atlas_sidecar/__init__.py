"""ATLAS sidecar: the speculative decoding engine, its speculators and backends, and the CLI."""

__version__ = "0.1.0"
