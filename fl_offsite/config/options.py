"""A config key declared once, on the settings field that holds it (as PEFT's configs carry their help).

``option("train.lr", 1e-4, "client AdamW learning rate")`` is a dataclass field whose metadata is the
:class:`Option`; the table of defaults, the choices, validation and ``from_config`` are all read from them.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from fl_offsite.errors import UserError

Value = bool | int | float | str


@dataclass(frozen=True)
class Option:
    """One run-config key: its default (as written in a config), help, allowed values and lower bound."""

    key: str
    default: Value
    help: str = ""
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    above: float | None = None  # a strict lower bound (a learning rate: above 0)
    parse: Callable[[Any], Any] | None = None  # config value -> the field's value (None: as it is)

    def value(self, raw: Value) -> Any:
        """The field's value for config value ``raw``; a value it cannot parse is a UserError naming the key."""
        if self.parse is None:
            return raw
        try:
            return self.parse(raw)
        except ValueError as err:
            raise UserError(f"{self.key} {err}") from None


def option(key: str, default: Value, help: str = "", *, choices: tuple[str, ...] = (), minimum: float | None = None,
           above: float | None = None, parse: Callable[[Any], Any] | None = None) -> Any:
    """A dataclass field bound to config key ``key``; its Python default is ``parse(default)``."""
    declared = Option(key, default, help, choices, minimum, above, parse)
    return dataclasses.field(default=declared.value(default), metadata={"option": declared})


def same_key(section: type, name: str) -> Any:
    """A field that reads the key declared on ``section.name`` (e.g. a block size two sections share)."""
    declared = option_of(section, name)
    return dataclasses.field(default=declared.value(declared.default), metadata={"option": declared, "shared": True})


def nested(section: type) -> Any:
    """A field holding an optional ``section`` (None unless the run asks for it), whose keys count as declared."""
    return dataclasses.field(default=None, metadata={"section": section})


def option_of(section: type, name: str) -> Option:
    (field,) = [f for f in dataclasses.fields(section) if f.name == name]
    return field.metadata["option"]


def declared_options(section: type) -> Iterator[Option]:
    """Every key declared (not shared) by ``section`` and the sections nested in it, in field order."""
    for field in dataclasses.fields(section):
        if "option" in field.metadata and not field.metadata.get("shared"):
            yield field.metadata["option"]
        elif (inner := _section_type(field)) is not None:
            yield from declared_options(inner)


def section_from(section: type, config: dict[str, Value], **values: Any) -> Any:
    """``section`` with each bound field read from ``config`` (validated), nested sections built the same way;
    ``values`` set the others."""
    for field in dataclasses.fields(section):
        if field.name in values:
            continue
        if "option" in field.metadata:
            values[field.name] = field.metadata["option"].value(config[field.metadata["option"].key])
        elif isinstance(field.default_factory, type) and dataclasses.is_dataclass(field.default_factory):
            values[field.name] = section_from(field.default_factory, config)
    return section(**values)


def _section_type(field: dataclasses.Field) -> type | None:
    """The section a field holds: a default-built one, or an optional one (:func:`nested`)."""
    if isinstance(field.default_factory, type) and dataclasses.is_dataclass(field.default_factory):
        return field.default_factory
    return field.metadata.get("section")
