"""Set-up for the baselines: Debian packages for nchan, a venv for the Flask ones.

Nothing here is needed by ssehub itself or by ``--smoke``. A step that fails is
returned as a reason, and the servers that needed it are reported as skipped.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv

from .servers import BENCH_VENV, nchan_module

__all__ = ["BENCH_PACKAGES", "setup"]

APT_PACKAGES = ("nginx-light", "libnginx-mod-nchan")
# packaging: gunicorn's gevent worker imports it without declaring it.
BENCH_PACKAGES = ("flask", "redis", "flask-sse", "gunicorn", "gevent", "packaging", "py-spy")


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _apt() -> str | None:
    if shutil.which("nginx") is not None and nchan_module() is not None:
        return None
    if shutil.which("apt-get") is None:
        return "apt-get not available to install nginx-light + libnginx-mod-nchan"
    sudo = [] if _is_root() else ["sudo", "-n"]
    _log(f"installing {' '.join(APT_PACKAGES)} with apt-get")
    env = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    for argv in (
        [*sudo, "apt-get", "update", "-qq"],
        [*sudo, "apt-get", "install", "-y", "-qq", "--no-install-recommends", *APT_PACKAGES],
    ):
        r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
        if r.returncode:
            last = (r.stderr.strip() or r.stdout.strip()).splitlines()[-1:] or ["failed"]
            return f"{' '.join(argv[:2])}: {last[0]}"
    return None if nchan_module() is not None else "nchan module missing after install"


def _is_root() -> bool:
    import os

    return os.geteuid() == 0


def _venv() -> str | None:
    py = BENCH_VENV / "bin" / "python"
    stamp = BENCH_VENV / (".installed-" + "-".join(BENCH_PACKAGES))
    if stamp.exists():
        return None
    try:
        if not py.exists():
            _log(f"creating {BENCH_VENV}")
            venv.create(BENCH_VENV, with_pip=True)
        _log(f"installing {' '.join(BENCH_PACKAGES)} into {BENCH_VENV}")
        r = subprocess.run(
            [str(py), "-m", "pip", "install", "-q", *BENCH_PACKAGES],
            capture_output=True,
            text=True,
            timeout=900,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"bench venv: {exc}"
    if r.returncode:
        errs = [ln for ln in r.stderr.splitlines() if "ERROR" in ln] or ["pip failed"]
        return f"pip install: {errs[-1]}"
    stamp.touch()
    return None


def setup(servers: list[str]) -> dict[str, str]:
    """Install what ``servers`` need; returns {server: reason} for those that cannot run."""
    reasons: dict[str, str] = {}
    if "nchan" in servers:
        reason = _apt()
        if reason:
            reasons["nchan"] = reason
    if {"flask-sse", "flask-recipe"} & set(servers):
        reason = _venv()
        if reason:
            reasons["flask-sse"] = reasons["flask-recipe"] = reason
    return reasons
