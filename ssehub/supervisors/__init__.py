"""Process models: the multiprocess main, its workers, the feed between them, systemd."""
