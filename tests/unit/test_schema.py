"""Every config key is declared once: the reader, the JSON Schema, the shipped schema files, the
README reference and the example config all agree with that declaration."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from gateway import ConfigError, config
from gateway.cli import schema_text
from gateway.config import CONFIG, config_reference, config_schema, parse_config

ROOT = Path(__file__).parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
EXAMPLE = (ROOT / "config" / "gateway.example.yaml").read_text("utf-8")
SHIPPED_SCHEMAS = [ROOT / "gateway" / "config.schema.json", ROOT / "config" / "config.schema.json"]
SHIPPED_CONFIGS = sorted(
    [
        *(ROOT / "config").glob("*.yaml"),
        ROOT / "gateway" / "demo.yaml",
        ROOT / "deploy" / "forward-auth" / "gateway.yaml",
        ROOT / "deploy" / "k8s" / "gateway.yaml",
    ]
)
VALIDATOR = jsonschema.Draft202012Validator(config_schema())
KEY_PATHS = [path for path, _ in CONFIG.walk()]


def test_the_schema_is_a_valid_draft_2020_12_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(config_schema())


@pytest.mark.parametrize("shipped", SHIPPED_SCHEMAS, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_shipped_schema_files_are_the_declarations(shipped: Path) -> None:
    # Regenerate with: gateway schema > gateway/config.schema.json (and the copy in config/).
    assert shipped.read_text(encoding="utf-8") == schema_text(config_schema())


def test_the_readme_reference_is_the_declarations() -> None:
    # Regenerate with: gateway schema --markdown (between the config-reference markers).
    begin = README.index("<!-- config-reference:")
    table = README[README.index("\n", begin) + 1 : README.index("<!-- /config-reference -->")]
    assert table.strip() == config_reference()


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_config_validates_against_the_schema(path: Path) -> None:
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    errors = [f"{e.json_path}: {e.message}" for e in VALIDATOR.iter_errors(document)]
    assert errors == []


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_config_names_the_schema_for_editors(path: Path) -> None:
    first = path.read_text(encoding="utf-8").splitlines()[0]
    match = re.fullmatch(r"# yaml-language-server: \$schema=(\S+)", first)
    assert match, first
    # Relative to where the file is found (config/demo.yaml is a link to gateway/demo.yaml).
    target = (path.parent / match.group(1)).resolve()
    assert target in {p.resolve() for p in SHIPPED_SCHEMAS}, target


@pytest.mark.parametrize("key", sorted({p.rsplit(".", 1)[-1].split("[")[0] for p in KEY_PATHS}))
def test_every_declared_key_is_in_the_example_config(key: str) -> None:
    assert re.search(rf"\b{re.escape(key)}:", EXAMPLE), key


def test_every_key_has_a_one_line_meaning() -> None:
    for path, key in CONFIG.walk():
        assert key.doc.strip(), path
        assert "\n" not in key.doc, path


# --- a key in one place and not the other -------------------------------------------------------
BASE: dict[str, Any] = {
    "issuers": {
        "corp": {
            "issuer": "https://id.example.com",
            "jwks_uri": "https://id.example.com/jwks.json",
            "algorithms": ["RS256"],
        }
    },
    "routes": [
        {
            "id": "api",
            "match": {"path_prefix": "/api"},
            "upstream": "http://api.internal:8080",
            "auth": {"issuers": ["corp"], "audiences": ["api"]},
        }
    ],
}
PLACEHOLDER = {"<id>": "corp", "<header>": "X-Probe"}
# What a section needs before a nested one is read (an upstream mapping needs its url).
FILL: dict[str, dict[str, Any]] = {"upstream": {"url": "https://api.internal:8443"}}


def _section_paths() -> list[str]:
    """Where each mapping section sits: the root, then every nested one."""
    paths = [""]
    for path, key in CONFIG.walk():
        for suffix, _ in key.kind.sections():
            paths.append(path + suffix)
    return paths


def _place(document: dict[str, Any], path: str, value: dict[str, Any]) -> str:
    """Put ``value`` at ``path`` (``routes[].auth.claims[]``) in ``document``; return the concrete
    path the loader names (``routes[0].auth.claims[0]``)."""
    if not path:
        document.update(value)
        return ""
    segments = re.findall(r"[^.\[\]]+|\[\]", path)
    where: Any = document
    concrete = ""
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment == "[]":
            if not isinstance(where, list) or not where:
                raise AssertionError(f"{path}: a list was expected at {concrete}")
            if last:
                where[0] = value
            where = where[0]
            concrete += "[0]"
            continue
        name = PLACEHOLDER.get(segment, segment)
        concrete += f".{name}" if concrete else name
        following = segments[index + 1] if not last else None
        if last:
            where[name] = value
        elif following == "[]":
            where.setdefault(name, [{}])
            if not isinstance(where[name], list):
                where[name] = [{}]
        elif not isinstance(where.get(name), dict):
            where[name] = dict(FILL.get(name, {}))
        where = where[name]
    return concrete


def _schema_refuses(errors: list[jsonschema.ValidationError], location: str, key: str) -> bool:
    for error in errors:
        found = ".".join(str(p) for p in error.absolute_path)
        if (
            error.validator == "additionalProperties"
            and key in error.message
            and found == location.replace("[", ".").replace("]", "")
        ):
            return True
        if _schema_refuses(list(error.context or []), location, key):
            return True
    return False


@pytest.mark.parametrize("section", _section_paths(), ids=lambda p: p or "<root>")
def test_an_unknown_key_is_refused_by_the_loader_and_the_schema_alike(section: str) -> None:
    document = copy.deepcopy(BASE)
    location = _place(document, section, {"probe_key": 1})
    expected = f"{location}.probe_key" if location else "probe_key"

    with pytest.raises(ConfigError) as refused:
        parse_config(document)
    assert str(refused.value).startswith(f"{expected}: unknown key 'probe_key'; expected one of:")
    assert _schema_refuses(list(VALIDATOR.iter_errors(document)), location, "probe_key")


@pytest.mark.parametrize("section", _section_paths(), ids=lambda p: p or "<root>")
def test_the_loader_and_the_schema_allow_the_same_keys(section: str) -> None:
    # The loader's "expected one of" list is the schema's properties, for every section.
    document = copy.deepcopy(BASE)
    location = _place(document, section, {"probe_key": 1})
    with pytest.raises(ConfigError) as refused:
        parse_config(document)
    allowed = str(refused.value).split("expected one of: ", 1)[1].split(", ")
    schema = config_schema()
    node = schema
    if section:
        node = _schema_at(schema, section)
    assert sorted(allowed) == sorted(node["properties"]), location


def _schema_at(schema: dict[str, Any], path: str) -> dict[str, Any]:
    """The object schema of the section at ``path``, following $refs and the mapping branch of
    a oneOf (``upstream``: a URL or a mapping)."""
    node: dict[str, Any] = schema
    for segment in re.findall(r"[^.\[\]]+|\[\]", path):
        node = _resolve(schema, node)
        if segment == "[]":
            node = node["items"]
        elif segment.startswith("<"):
            node = node["additionalProperties"]
        else:
            node = node["properties"][segment]
    return _resolve(schema, node)


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in node:
        return _resolve(schema, schema["$defs"][node["$ref"].rsplit("/", 1)[1]])
    if "oneOf" in node:
        for branch in node["oneOf"]:
            resolved = _resolve(schema, branch)
            if resolved.get("type") == "object":
                return resolved
    return node


def test_an_editor_sees_a_misspelt_key_where_the_loader_does() -> None:
    document = yaml.safe_load(EXAMPLE)
    document["limits"]["max_body_byte"] = document["limits"].pop("max_body_bytes")
    [error] = VALIDATOR.iter_errors(document)
    assert list(error.absolute_path) == ["limits"]
    assert "'max_body_byte' was unexpected" in error.message
    with pytest.raises(ConfigError, match=r"^limits\.max_body_byte: unknown key 'max_body_byte'"):
        parse_config(document)


def test_a_wrong_type_is_refused_by_both() -> None:
    document = copy.deepcopy(BASE)
    document["limits"] = {"max_headers": "many"}
    [error] = VALIDATOR.iter_errors(document)
    assert list(error.absolute_path) == ["limits", "max_headers"]
    with pytest.raises(ConfigError, match=r"^limits\.max_headers: got 'many'"):
        parse_config(document)


def test_the_schema_carries_the_declared_defaults_and_ranges() -> None:
    limits = config_schema()["$defs"]["limits"]["properties"]
    assert limits["max_headers"]["default"] == config.Limits().max_headers
    assert (limits["max_headers"]["minimum"], limits["max_headers"]["maximum"]) == (8, 10_000)
