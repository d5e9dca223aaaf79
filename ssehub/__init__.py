"""ssehub: a Server-Sent Events hub fed by Redis pub/sub."""

__version__ = "0.1.0"
