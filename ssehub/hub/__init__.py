"""The hub: channels and members, the fan-out hot path, resume, sessions."""
