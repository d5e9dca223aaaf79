"""The documentation stays true: it builds strictly, its links resolve, and the
configuration reference, the metrics tables, the design's module table and the example
configs agree with the code. (The commands the docs show run in test_doc_commands.py.)"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import types
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from markdown.extensions.toc import slugify

from ssehub.cli.main import main as ssehub_main
from ssehub.config import Config, ConfigError, parse
from ssehub.node import RESTART_ONLY

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
REFERENCE = DOCS / "configuration.md"
EXAMPLES = sorted((ROOT / "config" / "examples").glob("*.yaml"))
CONFIGS = [ROOT / "config" / "ssehub.yaml", *EXAMPLES, ROOT / "deploy" / "ssehub.compose.yaml"]
# A secret for config/examples/private.yaml (auth.secret_env), as its comment says to set.
# And the publish key of config/examples/control.yaml (publish.key_env).
SECRET_ENV = {
    "SSEHUB_JWT_SECRET": "0123456789abcdef0123456789abcdef",
    "SSEHUB_PUBLISH_KEY": "0123456789abcdef0123456789abcdef",
}


# --- the site ---------------------------------------------------------------------------


def test_docs_build_strictly_with_every_link_and_anchor_resolved(tmp_path: Path) -> None:
    # `./dev docs build` is `mkdocs build --strict` (its output in build/site, here in tmp).
    result = subprocess.run(
        [str(ROOT / "dev"), "docs", "build", "--site-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "configuration" / "index.html").is_file()


def test_every_page_is_in_the_navigation() -> None:
    # mkdocs.yml's validation.omitted_files fails the strict build on a page left out;
    # this says which one without a build.
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text().split("\ntheme:")[0])["nav"]

    def pages(items: Any) -> Iterator[str]:
        for item in items:
            for value in item.values():
                yield from pages(value) if isinstance(value, list) else [value]

    listed = set(pages(nav))
    on_disk = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert on_disk == listed


def headings(path: Path) -> set[str]:
    """The anchors of a Markdown file's headings, as mkdocs (and, for these, GitHub) make them."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {slugify(m.group(1).strip(), "-") for m in re.finditer(r"^#+ (.+)$", text, re.M)}


@pytest.mark.parametrize("name", ["README.md", "CHANGELOG.md"])
def test_links_outside_the_site_resolve(name: str) -> None:
    # README.md and CHANGELOG.md are read on the forge, outside mkdocs' checks.
    source = ROOT / name
    text = re.sub(r"```.*?```", "", source.read_text(), flags=re.S)
    checked = 0
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # http(s):, mailto:
        path, _, anchor = target.partition("#")
        file = (source.parent / path) if path else source
        assert file.exists(), f"{name}: link to {target}: no such file"
        if anchor:
            assert anchor in headings(file), f"{name}: link to {target}: no such heading"
        checked += 1
    assert checked or name == "CHANGELOG.md"


def test_readme_is_a_front_door() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, "README.md is the front door: move details into docs/"


# --- the configuration reference --------------------------------------------------------


def accepted_keys(cls: type = Config, prefix: str = "") -> dict[str, dataclasses.Field[Any]]:
    """Every leaf key the loader accepts, as ``section.key`` or ``channels.<name>.key``."""
    hints = typing.get_type_hints(cls)
    keys: dict[str, dataclasses.Field[Any]] = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal") or (cls.__name__ == "ChannelConfig" and f.name == "name"):
            continue  # set by the loader, refused in a file
        tp = hints[f.name]
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        if typing.get_origin(tp) in (Mapping, dict):
            tp = typing.get_args(tp)[1]
            keys.update(accepted_keys(tp, f"{prefix}{f.name}.<name>."))
        elif dataclasses.is_dataclass(tp):
            keys.update(accepted_keys(typing.cast(type, tp), f"{prefix}{f.name}."))
        else:
            keys[prefix + f.name] = f
    return keys


def reference_rows() -> dict[str, str]:
    """The reference's tables: key -> its default cell."""
    rows = {}
    for m in re.finditer(r"^\| `([a-z_.<>]+)` \|([^|]*)\|", REFERENCE.read_text(), re.M):
        assert m.group(1) not in rows, f"{m.group(1)} is in the reference twice"
        rows[m.group(1)] = m.group(2).strip()
    return rows


def test_the_reference_lists_every_key_the_loader_accepts() -> None:
    missing = sorted(set(accepted_keys()) - set(reference_rows()))
    assert not missing, (
        f"config keys missing from docs/configuration.md: {missing} — add a row to the "
        "table of their section (and a comment in config/ssehub.yaml)"
    )


def test_every_key_in_the_reference_is_accepted() -> None:
    unknown = sorted(set(reference_rows()) - set(accepted_keys()))
    assert not unknown, f"docs/configuration.md lists keys the loader does not know: {unknown}"
    # Ask the loader itself: a key it knows fails on its value, never as unknown.
    probe: dict[str, int] = {"probe": 1}  # a value no key accepts
    for key in reference_rows():
        data: dict[str, Any] = {"channels": {"c": {}}}
        node = data
        *path, leaf = key.replace("<name>", "c").split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = probe
        with pytest.raises(ConfigError) as info:
            parse(data)
        assert "unknown key" not in str(info.value), key


def test_defaults_shown_in_the_reference_are_the_code_s() -> None:
    fields = accepted_keys()
    compared = 0
    for key, cell in reference_rows().items():
        literal = re.fullmatch(r"`([^`]*)`", cell)
        if literal is None:
            continue  # prose: "off", "the name", "not checked"
        f = fields[key]
        default = f.default_factory() if callable(f.default_factory) else f.default
        shown = yaml.safe_load(literal.group(1))
        if isinstance(default, tuple):
            default = list(default)
        assert shown == default, f"docs/configuration.md: {key} default {cell}, code {default!r}"
        compared += 1
    assert compared > 50


def test_the_restart_only_list_is_the_code_s() -> None:
    text = REFERENCE.read_text()
    sentence = text[text.index("**Restart only:**") :].split("take effect on restart")[0]
    assert set(re.findall(r"`([a-z_]+)`", sentence)) == set(RESTART_ONLY)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_example_config_passes_check(
    config: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in SECRET_ENV.items():
        monkeypatch.setenv(name, value)
    assert ssehub_main(["--config", str(config), "--check"]) == 0, capsys.readouterr().err
    assert ": ok (" in capsys.readouterr().out


def test_the_reference_names_every_example() -> None:
    text = REFERENCE.read_text()
    for config in CONFIGS:
        assert f"`{config.relative_to(ROOT)}`" in text, config


# --- metrics and modules ------------------------------------------------------------------

NOT_METRICS = {"ssehub_token"}  # auth.cookie's default


def test_the_metrics_tables_name_every_metric() -> None:
    code = set()
    for path in (ROOT / "ssehub").rglob("*.py"):
        code |= set(re.findall(r"[\"'](ssehub_[a-z_]+)[\"']", path.read_text()))
    code -= NOT_METRICS
    text = (DOCS / "operations.md").read_text()
    documented = {
        m.removesuffix("_total") for m in re.findall(r"^\| `(ssehub_[a-z_]+)` \|", text, re.M)
    }
    assert documented == code, (
        f"in the code, not in docs/operations.md: {sorted(code - documented)}; "
        f"documented, not in the code: {sorted(documented - code)}"
    )


def test_the_design_names_every_module() -> None:
    text = (DOCS / "design.md").read_text()
    named = set(re.findall(r"^\| `([a-z_/]+\.py)` \|", text, re.M))
    modules = {
        str(p.relative_to(ROOT / "ssehub"))
        for p in (ROOT / "ssehub").rglob("*.py")
        if p.name not in ("__init__.py", "__main__.py")
    }
    assert named == modules, (
        f"modules missing from docs/design.md's table: {sorted(modules - named)}; "
        f"named there but gone: {sorted(named - modules)}"
    )
