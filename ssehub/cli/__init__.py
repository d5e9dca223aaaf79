"""The command line: argument parsing, ``ssehub token``."""
