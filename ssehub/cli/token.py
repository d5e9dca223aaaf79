"""``ssehub token``: print a token signed with the configured key, to try a private channel."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization

from ..config import HMAC_ALGORITHMS, ConfigError, load
from ..http.auth import Denied, Verifier, issue

__all__ = ["main", "parse_ttl"]

EXIT_CONFIG = 2  # as cli.EXIT_CONFIG (not imported: cli imports this module lazily)

_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_ttl(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``1h``, ``2d`` as seconds."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd]?)", text.strip())
    if m is None or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(
            f"expected a duration like 90s, 15m, 1h or 2d, got {text!r}"
        )
    return float(m.group(1)) * _UNITS[m.group(2)]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ssehub token",
        description="Print a JWT for the hub's auth config (HS* secret from the config, "
        "or an RS*/ES* private key given here), e.g. to try a private channel with curl.",
    )
    p.add_argument(
        "--config",
        "-c",
        default=os.environ.get("SSEHUB_CONFIG", "/etc/ssehub/ssehub.yaml"),
        help="YAML config file with an auth section (default: $SSEHUB_CONFIG or %(default)s)",
    )
    p.add_argument("--sub", help="the token's subject (sub claim), e.g. a user id")
    p.add_argument(
        "--subscribe",
        action="append",
        default=[],
        metavar="CHANNEL",
        help="a channel name or * pattern the bearer may subscribe to (repeatable)",
    )
    p.add_argument("--ttl", type=parse_ttl, default=3600.0, help="lifetime (default: 1h)")
    p.add_argument("--private-key", help="PEM private key, for RS*/PS*/ES* configs")
    p.add_argument("--alg", help="algorithm (default: the first of auth.algorithms)")
    return p


def main(argv: Sequence[str]) -> int:
    """Print the token; 2 for a config or key that cannot sign one the hub accepts."""
    args = _parser().parse_args(argv)

    def fail(message: str) -> int:
        print(f"ssehub token: {message}", file=sys.stderr)
        return EXIT_CONFIG

    try:
        config = load(args.config)
    except ConfigError as exc:
        return fail(str(exc))
    auth = config.auth
    if auth is None:
        return fail(f"{args.config}: no auth section: no channel needs a token")
    alg = args.alg or auth.algorithms[0]
    if alg not in auth.algorithms:
        return fail(f"--alg {alg}: the hub accepts only {', '.join(auth.algorithms)}")
    key: Any = auth.key
    if alg not in HMAC_ALGORITHMS:
        if not args.private_key:
            return fail(f"{alg} tokens are signed with a private key: give --private-key FILE")
        try:
            pem = Path(args.private_key).read_bytes()
        except OSError as exc:
            return fail(f"--private-key: cannot read: {exc.strerror or exc}")
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as exc:
            return fail(f"--private-key: not an unencrypted PEM private key: {exc}")
    try:
        token = issue(
            key,
            alg,
            subject=args.sub,
            subscribe=args.subscribe,
            ttl=args.ttl,
            audience=auth.audience,
            issuer=auth.issuer,
        )
        # The hub's own check, so a private key that does not match key_file says so here.
        Verifier(auth).verify(token)
    except (ValueError, TypeError, jwt.PyJWTError) as exc:
        return fail(f"--private-key: not a private key for {alg}: {exc}")
    except Denied as exc:
        return fail(f"the hub would refuse this token: {exc.reason}")
    print(token)
    return 0
