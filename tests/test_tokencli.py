"""``ssehub token``: a token the configured hub accepts, in one step."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ssehub.cli.main import EXIT_CONFIG, main
from ssehub.cli.token import parse_ttl
from ssehub.config import load

from .conftest import StartHub
from .sseclient import open_stream
from .test_auth import SECRET


def write_config(tmp_path: Path, auth: str) -> Path:
    path = tmp_path / "hub.yaml"
    path.write_text(
        f"auth: {auth}\nchannels:\n  chat: {{}}\n  user.42: {{auth: token}}\nlisten: {{port: 0}}\n"
    )
    return path


@pytest.fixture
def hs_config(tmp_path: Path) -> Path:
    (tmp_path / "secret").write_bytes(SECRET)
    return write_config(tmp_path, f"{{secret_file: {tmp_path / 'secret'}, audience: hub}}")


def test_token_is_signed_with_the_configured_secret(
    hs_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["token", "--config", str(hs_config), "--sub", "user42", "--ttl", "1h"]
    assert main([*argv, "--subscribe", "user.42", "--subscribe", "news.*"]) == 0
    token = capsys.readouterr().out.strip()
    claims = jwt.decode(token, SECRET, algorithms=["HS256"], audience="hub")
    assert claims["sub"] == "user42"
    assert claims["ssehub"] == {"subscribe": ["user.42", "news.*"]}
    assert abs(claims["exp"] - (time.time() + 3600)) < 5


async def test_printed_token_opens_the_private_channel(
    hs_config: Path, start_hub: StartHub, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["token", "-c", str(hs_config), "--subscribe", "user.*"]) == 0
    token = capsys.readouterr().out.strip()
    config = load(hs_config)
    assert config.auth is not None
    hub = await start_hub(
        {"user.42": {"auth": "token"}},
        auth={"secret_file": config.auth.secret_file, "audience": "hub"},
    )
    c = await open_stream(
        hub.port, "/channels/user.42", headers={"Authorization": f"Bearer {token}"}
    )
    await c.close()


def test_es256_needs_the_matching_private_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = []
    for name in ("good", "other"):
        private = ec.generate_private_key(ec.SECP256R1())
        pem = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        (tmp_path / f"{name}.pem").write_bytes(pem)
        public = private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        (tmp_path / f"{name}.pub").write_bytes(public)
        keys.append(tmp_path / f"{name}.pem")
    config = write_config(tmp_path, f"{{algorithms: [ES256], key_file: {tmp_path / 'good.pub'}}}")
    base = ["token", "-c", str(config), "--subscribe", "user.42"]
    assert main(base) == EXIT_CONFIG
    assert "give --private-key" in capsys.readouterr().err
    assert main([*base, "--private-key", str(keys[1])]) == EXIT_CONFIG
    assert "would refuse this token: bad signature" in capsys.readouterr().err
    assert main([*base, "--private-key", str(tmp_path / "good.pub")]) == EXIT_CONFIG
    assert "not an unencrypted PEM private key" in capsys.readouterr().err
    assert main([*base, "--private-key", str(keys[0])]) == 0
    token = capsys.readouterr().out.strip()
    assert jwt.get_unverified_header(token)["alg"] == "ES256"


def test_without_auth_section_or_with_foreign_alg_it_says_why(
    tmp_path: Path, hs_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plain = tmp_path / "plain.yaml"
    plain.write_text("channels: {chat: {}}\n")
    assert main(["token", "-c", str(plain)]) == EXIT_CONFIG
    assert "no auth section" in capsys.readouterr().err
    assert main(["token", "-c", str(hs_config), "--alg", "HS512"]) == EXIT_CONFIG
    assert "accepts only HS256" in capsys.readouterr().err
    assert main(["token", "-c", str(tmp_path / "missing.yaml")]) == EXIT_CONFIG


def test_ttl_units() -> None:
    assert [parse_ttl(t) for t in ("90", "90s", "15m", "1h", "2d")] == [90, 90, 900, 3600, 172800]
    for bad in ("", "1w", "-1h", "0"):
        with pytest.raises(Exception, match="expected a duration"):
            parse_ttl(bad)


def test_entry_point_runs_the_subcommand_and_check_still_works(hs_config: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ssehub", "token", "-c", str(hs_config), "--subscribe", "x"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert out.count(".") == 2
    check = subprocess.run(
        [sys.executable, "-m", "ssehub", "--config", str(hs_config), "--check"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    ok = f"{hs_config}: ok (2 channels, 0 families, 1 worker)\n"
    assert (check.returncode, check.stdout) == (0, ok)
