"""Pure parts: SSE encoding, message formats, history, families, waiting helpers."""
