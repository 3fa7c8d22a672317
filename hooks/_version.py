"""The package version; the wire protocol has its own version in schema.py."""

__version__ = "0.1.0"
