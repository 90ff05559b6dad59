"""Compose's variable interpolation (the Compose Specification, "Interpolation"), enough to
check deploy/compose.yaml without Docker: ${VAR}, ${VAR:-default}, ${VAR-default},
${VAR:?error}, ${VAR?error}, $VAR and $$ (a literal $)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

_PATTERN = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)"
    r"(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)


class InterpolationError(ValueError):
    pass


def interpolate_text(text: str, env: Mapping[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        if match.group("escaped"):
            return "$"
        name = match.group("braced") or match.group("named")
        op, arg = match.group("op"), match.group("arg") or ""
        value = env.get(name)
        unset_or_empty = value is None or value == ""
        if op in (":-", "-") and (value is None or (op == ":-" and unset_or_empty)):
            return arg
        if op in (":?", "?") and (value is None or (op == ":?" and unset_or_empty)):
            raise InterpolationError(f"required variable {name} is missing a value: {arg}")
        return value or ""

    return _PATTERN.sub(replace, text)


def interpolate(node: Any, env: Mapping[str, str]) -> Any:
    """Interpolate every string of a loaded compose document (values, not keys)."""
    if isinstance(node, str):
        return interpolate_text(node, env)
    if isinstance(node, list):
        return [interpolate(item, env) for item in node]
    if isinstance(node, dict):
        return {key: interpolate(value, env) for key, value in node.items()}
    return node
