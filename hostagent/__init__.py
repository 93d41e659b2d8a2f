"""The host agent: a standalone daemon run on every VSP (imports nothing from the console)."""

__version__ = "0.1.0"
