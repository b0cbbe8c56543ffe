"""How a config key is declared: once, with its kind, default and one line of documentation.

A key is a field of one of config.py's frozen dataclasses, declared with ``setting``,
``optional`` or ``required``; a key with no field of its own (``jwks_file``, the parts of a
``token_from`` entry) is a ``Key`` in a ``Section``'s ``extra``.  From those declarations come:

- the reader: ``Section.read`` checks the mapping's keys (unknown or missing ones are errors
  naming the YAML path and the allowed set) and reads each key with its kind;
- the JSON Schema (draft 2020-12) that ``gateway schema`` prints and the package ships;
- the README's configuration reference (``gateway schema --markdown``).

A kind reads one YAML value (``Node``) into a typed value and describes itself as a schema
fragment.  ``setting(default, kind, doc)`` is typed ``T`` so mypy checks that the field's type,
the default and the kind agree.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Generic, TypeVar, cast

from .errors import ConfigError

T = TypeVar("T")
U = TypeVar("U")
E = TypeVar("E", bound=enum.StrEnum)

_META: Final = "gateway.key"
SCHEMA_ID: Final = "https://github.com/gateway/gateway/config.schema.json"


# --- the YAML value being read ------------------------------------------------------
class Node:
    """A YAML value together with its path, so every error can say where it is.

    ``context`` rides along to every child: the config file's folder (relative paths) and what
    earlier sections decided (the issuers a route may name, the limits it inherits)."""

    __slots__ = ("context", "path", "value")

    def __init__(self, value: Any, path: str, context: Any = None) -> None:
        self.value = value
        self.path = path
        self.context = context

    def child(self, key: str | int) -> Node:
        if isinstance(key, int):
            return Node(self.value[key], f"{self.path}[{key}]", self.context)
        sep = "." if self.path else ""
        value = self.value.get(key) if isinstance(self.value, dict) else None
        return Node(value, f"{self.path}{sep}{key}", self.context)

    def fail(self, problem: str, expected: str | None = None) -> ConfigError:
        return ConfigError(self.path or "<root>", problem, expected)

    def mapping(self, allowed: frozenset[str], required: frozenset[str] = frozenset()) -> Node:
        if not isinstance(self.value, dict):
            raise self.fail(f"got {show(self.value)}", "a mapping")
        for key in self.value:
            if not isinstance(key, str) or key not in allowed:
                raise self.child(str(key)).fail(
                    f"unknown key {key!r}", f"one of: {', '.join(sorted(allowed))}"
                )
        for key in sorted(required):
            if key not in self.value:
                raise self.child(key).fail("missing required key")
        return self

    def has(self, key: str) -> bool:
        return isinstance(self.value, dict) and key in self.value

    def items(self) -> Iterator[tuple[str, Node]]:
        assert isinstance(self.value, dict)
        for key in self.value:
            yield str(key), self.child(key)

    def seq(self, *, non_empty: bool = False) -> list[Node]:
        if not isinstance(self.value, list):
            raise self.fail(f"got {show(self.value)}", "a list")
        if non_empty and not self.value:
            raise self.fail("empty list", "at least one entry")
        return [self.child(i) for i in range(len(self.value))]

    def string(self, *, pattern: re.Pattern[str] | None = None, what: str = "") -> str:
        if not isinstance(self.value, str) or not self.value:
            raise self.fail(f"got {show(self.value)}", what or "a non-empty string")
        if pattern is not None and not pattern.fullmatch(self.value):
            raise self.fail(f"invalid value {self.value!r}", what or f"to match {pattern.pattern}")
        return self.value

    def number(self, *, positive: bool = True, allow_zero: bool = False) -> float:
        value = self.value
        if isinstance(value, bool) or not isinstance(value, int | float) or not _finite(value):
            raise self.fail(f"got {show(value)}", "a number of seconds")
        if positive and (value < 0 or (value == 0 and not allow_zero)):
            raise self.fail(f"got {value}", "a number >= 0" if allow_zero else "a number > 0")
        return float(value)

    def integer(self, *, low: int, high: int) -> int:
        value = self.value
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.fail(f"got {show(value)}", f"an integer from {low} to {high}")
        return value

    def choice(self, options: list[str]) -> str:
        if self.value not in options:
            raise self.fail(f"got {show(self.value)}", f"one of: {', '.join(options)}")
        return str(self.value)

    def boolean(self) -> bool:
        if not isinstance(self.value, bool):
            raise self.fail(f"got {show(self.value)}", "true or false")
        return self.value


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def show(value: Any) -> str:
    """A bad value as an error message quotes it: short, and never a huge repr."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return "a very large integer"  # repr() of a huge int may itself refuse (int_max_str_digits)
    if value is None:
        return "nothing"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --- kinds: how one value is read and described ---------------------------------------
class Kind(Generic[T]):
    """How one key's value is read (``read``) and described (``schema``)."""

    def read(self, node: Node) -> T:
        raise NotImplementedError

    def schema(self) -> dict[str, Any]:
        raise NotImplementedError

    def sections(self) -> Iterator[tuple[str, Section[Any]]]:
        """The nested sections, with the path suffix they sit at (``""``, ``[]``, ``.<id>``)."""
        return iter(())


@dataclass(frozen=True)
class Integer(Kind[int]):
    low: int
    high: int

    def read(self, node: Node) -> int:
        return node.integer(low=self.low, high=self.high)

    def schema(self) -> dict[str, Any]:
        return {"type": "integer", "minimum": self.low, "maximum": self.high}


@dataclass(frozen=True)
class Seconds(Kind[float]):
    """A duration in seconds: > 0, or >= 0 with ``allow_zero``; at most ``at_most``."""

    allow_zero: bool = False
    at_most: float | None = None

    def read(self, node: Node) -> float:
        value = node.number(allow_zero=self.allow_zero)
        if self.at_most is not None and value > self.at_most:
            raise node.fail(f"got {value:g}", f"at most {self.at_most:g} seconds")
        return value

    def schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "number"}
        out["minimum" if self.allow_zero else "exclusiveMinimum"] = 0
        if self.at_most is not None:
            out["maximum"] = self.at_most
        return out


@dataclass(frozen=True)
class Ratio(Kind[float]):
    """A fraction from 0 to 1."""

    def read(self, node: Node) -> float:
        value = node.value
        if isinstance(value, bool) or not isinstance(value, int | float) or not _finite(value):
            raise node.fail(f"got {show(value)}", "a number from 0 to 1")
        if not 0 <= value <= 1:
            raise node.fail(f"got {value}", "a number from 0 to 1")
        return float(value)

    def schema(self) -> dict[str, Any]:
        return {"type": "number", "minimum": 0, "maximum": 1}


@dataclass(frozen=True)
class Boolean(Kind[bool]):
    def read(self, node: Node) -> bool:
        return node.boolean()

    def schema(self) -> dict[str, Any]:
        return {"type": "boolean"}


@dataclass(frozen=True)
class Text(Kind[str]):
    """A non-empty string, matching ``pattern`` when given; ``what`` is the expected form."""

    pattern: re.Pattern[str] | None = None
    what: str = ""

    def read(self, node: Node) -> str:
        return node.string(pattern=self.pattern, what=self.what)

    def schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "string", "minLength": 1}
        if self.pattern is not None:
            out["pattern"] = f"^(?:{self.pattern.pattern})$"
        return out


@dataclass(frozen=True)
class Choice(Kind[E]):
    """One of an enum's values (in the enum's order in messages)."""

    options: type[E]

    def read(self, node: Node) -> E:
        return self.options(node.choice([m.value for m in self.options]))

    def schema(self) -> dict[str, Any]:
        return {"enum": [m.value for m in self.options]}


@dataclass(frozen=True)
class Custom(Kind[T]):
    """A value read by a function of its own, with the schema fragment it accepts."""

    reader: Callable[[Node], T]
    fragment: Mapping[str, Any]
    nested: tuple[tuple[str, Section[Any]], ...] = ()

    def read(self, node: Node) -> T:
        return self.reader(node)

    def schema(self) -> dict[str, Any]:
        return dict(self.fragment)

    def sections(self) -> Iterator[tuple[str, Section[Any]]]:
        return iter(self.nested)


@dataclass(frozen=True)
class Nested(Kind[T]):
    """A mapping read by a section."""

    section: Section[T]

    def read(self, node: Node) -> T:
        return self.section.read(node)

    def schema(self) -> dict[str, Any]:
        return {"$ref": f"#/$defs/{self.section.name}"}

    def sections(self) -> Iterator[tuple[str, Section[Any]]]:
        yield "", self.section


# --- keys and sections ----------------------------------------------------------------
class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Final = _Required()


@dataclass(frozen=True)
class Key(Generic[T]):
    """One YAML key: its kind, the default when absent, and what it means.

    ``shown`` is the default as the reference prints it when the value alone would mislead
    (``limits.max_body_bytes``, ``discovery``); ``field`` is the dataclass field it fills
    (``None``: the section's builder reads it)."""

    name: str
    kind: Kind[T]
    doc: str
    default: T | _Required | None = REQUIRED
    shown: str | None = None
    field: str | None = None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


def setting(
    default: T, kind: Kind[T], doc: str, *, key: str = "", shown: str = "", bare: bool = False
) -> T:
    """A dataclass field that is the YAML key ``key`` (default: the field's name), ``default``
    when absent; ``bare``: no dataclass default (for a field positional constructions put before
    fields without defaults)."""
    spec = Key("", kind, doc, default, shown or None)
    if bare:
        return dataclasses.field(metadata={_META: (key, spec)})  # type: ignore[no-any-return]
    return dataclasses.field(default=default, metadata={_META: (key, spec)})


def optional(
    kind: Kind[T], doc: str, *, key: str = "", shown: str = "—", bare: bool = False
) -> T | None:
    """A field that is ``None`` when its key is absent; ``bare``: no dataclass default (for a
    field that positional constructions put before required ones)."""
    spec: Key[T] = Key("", kind, doc, None, shown)
    if bare:
        return cast(T | None, dataclasses.field(metadata={_META: (key, spec)}))
    return cast(T | None, dataclasses.field(default=None, metadata={_META: (key, spec)}))


def required(kind: Kind[T], doc: str, *, key: str = "") -> T:
    """A field whose key must be given."""
    spec: Key[T] = Key("", kind, doc)
    return cast(T, dataclasses.field(metadata={_META: (key, spec)}))


class Values:
    """What a section read: each key's value (its default when absent) and whether it was given."""

    def __init__(self, node: Node, keys: Mapping[str, Key[Any]]) -> None:
        self.node = node
        self._keys = keys
        self._read: dict[str, Any] = {}

    def given(self, name: str) -> bool:
        return self.node.has(name)

    def get(self, name: str) -> Any:
        """The value of key ``name``, read on first use (so a builder picks the order errors are
        found in); the declared default when absent."""
        if name not in self._read:
            key = self._keys[name]
            if self.node.has(name):
                self._read[name] = key.kind.read(self.node.child(name))
            else:
                assert not key.required  # Section.read refused its absence already
                self._read[name] = key.default
        return self._read[name]

    def fields(self, **overrides: Any) -> dict[str, Any]:
        """Every field's value, by field name, for the dataclass; ``overrides`` win."""
        out = {}
        for name, key in self._keys.items():
            if key.field is not None and key.field not in overrides:
                out[key.field] = self.get(name)
        out.update(overrides)
        return out


class Section(Generic[T]):
    """A YAML mapping: its keys (the dataclass's declared fields, then ``extra``) and how the
    values become the object (``build``; default: the dataclass from its fields).

    ``name`` is the ``$defs`` name in the JSON Schema; ``rules`` adds schema constraints
    between keys that the builder enforces (``oneOf`` required keys and the like)."""

    def __init__(
        self,
        name: str,
        model: type[T] | None,
        *,
        doc: str,
        extra: tuple[Key[Any], ...] = (),
        build: Callable[[Values], T] | None = None,
        rules: Mapping[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.doc = doc
        self.rules = dict(rules or {})
        keys: list[Key[Any]] = []
        if model is not None:
            for field in dataclasses.fields(model):  # type: ignore[arg-type]
                if _META in field.metadata:
                    yaml_name, spec = field.metadata[_META]
                    keys.append(
                        dataclasses.replace(spec, name=yaml_name or field.name, field=field.name)
                    )
        keys.extend(extra)
        self.keys: Mapping[str, Key[Any]] = {key.name: key for key in keys}
        assert len(self.keys) == len(keys), f"{name}: a key declared twice"
        if build is None:
            assert model is not None
            factory = model

            def build(values: Values) -> T:
                return factory(**values.fields())

        self._build = build
        self.allowed = frozenset(self.keys)
        self.required = frozenset(k.name for k in keys if k.required)

    def read(self, node: Node) -> T:
        node.mapping(self.allowed, self.required)
        return self._build(Values(node, self.keys))

    # --- derived descriptions ---
    def schema(self) -> dict[str, Any]:
        properties: dict[str, Any] = {}
        for key in self.keys.values():
            prop = {"description": key.doc, **key.kind.schema()}
            plain = _json_default(key.default)
            if plain is not None and key.shown is None:
                prop["default"] = plain
            properties[key.name] = prop
        out: dict[str, Any] = {
            "type": "object",
            "description": self.doc,
            "properties": properties,
            "additionalProperties": False,
        }
        if self.required:
            out["required"] = sorted(self.required)
        out.update(self.rules)
        return out

    def walk(self, prefix: str = "") -> Iterator[tuple[str, Key[Any]]]:
        """Every key below this section, depth first, with its dotted YAML path."""
        for key in self.keys.values():
            path = f"{prefix}.{key.name}" if prefix else key.name
            yield path, key
            for suffix, section in key.kind.sections():
                yield from section.walk(path + suffix)

    def all_sections(self) -> Iterator[Section[Any]]:
        yield self
        for key in self.keys.values():
            for _, section in key.kind.sections():
                yield from section.all_sections()


def _json_default(value: Any) -> Any:
    """A default as JSON, or ``None`` when it has no plain JSON form worth showing."""
    if value is None or value is REQUIRED:
        return None
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else value
    if isinstance(value, tuple | frozenset) and not value:
        return []
    return None


def shown_default(key: Key[Any]) -> str:
    """The default as the reference table prints it."""
    if key.required:
        return "required"
    if key.shown is not None:
        return key.shown
    value = _json_default(key.default)
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if value is None:
        return "—"
    if value == []:
        return "`[]`"
    return f"`{value}`"


# --- what is derived from the declarations ----------------------------------------------
def json_schema(root: Section[Any], *, title: str) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a document read by ``root``."""
    defs: dict[str, Any] = {}
    for section in root.all_sections():
        if section is not root:
            defs.setdefault(section.name, section.schema())
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": title,
        **root.schema(),
        "$defs": dict(sorted(defs.items())),
    }


def reference_table(root: Section[Any]) -> str:
    """The README's configuration reference: one row per key, in declaration order."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for path, key in root.walk():
        doc = key.doc.replace("|", "\\|")
        rows.append(f"| `{path}` | {shown_default(key)} | {doc} |")
    return "\n".join(rows)


def file_path(node: Node, what: str) -> Path:
    """A path given in the config, relative to the config file's folder unless absolute."""
    path = Path(node.string(what=what))
    base_dir = getattr(node.context, "base_dir", None)
    return base_dir / path if not path.is_absolute() and base_dir is not None else path


__all__ = [
    "REQUIRED",
    "Boolean",
    "Choice",
    "Custom",
    "Integer",
    "Key",
    "Kind",
    "Nested",
    "Node",
    "Ratio",
    "Seconds",
    "Section",
    "Text",
    "Values",
    "file_path",
    "json_schema",
    "optional",
    "reference_table",
    "required",
    "setting",
    "show",
]
