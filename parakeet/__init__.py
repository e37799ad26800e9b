"""parakeet-server: a streaming speech recognition server."""

__version__ = "0.1.0"
