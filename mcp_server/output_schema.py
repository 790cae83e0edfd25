"""Output schemas in the shape clients validate cheaply: `$defs` inlined, `T | None` as a list
of types."""

from __future__ import annotations

from typing import Any, cast


class _Recursive(Exception):
    """A schema definition refers to itself: it cannot be inlined."""


def _inline(node: Any, defs: dict[str, Any], active: tuple[str, ...]) -> Any:
    if isinstance(node, list):
        return [_inline(item, defs, active) for item in cast("list[Any]", node)]
    if not isinstance(node, dict):
        return node
    mapping = cast("dict[str, Any]", node)
    ref = mapping.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/") and len(mapping) == 1:
        name = ref.removeprefix("#/$defs/")
        if name in active:
            raise _Recursive(name)
        return _inline(defs[name], defs, (*active, name))
    out = {k: _inline(v, defs, active) for k, v in mapping.items() if k != "$defs"}
    variants = out.get("anyOf")
    if isinstance(variants, list) and len(cast("list[Any]", variants)) == 2:
        kinds = [_lone_type(v) for v in cast("list[Any]", variants)]
        if "null" in kinds and None not in kinds:
            del out["anyOf"]
            out["type"] = [k for k in kinds if k != "null"] + ["null"]
    return out


def _lone_type(variant: Any) -> str | None:
    """`T` of a `{"type": T}` schema with nothing else (a simple type), else None."""
    if isinstance(variant, dict):
        mapping = cast("dict[str, Any]", variant)
        kind = mapping.get("type")
        if len(mapping) == 1 and isinstance(kind, str):
            return kind
    return None


def simple_output_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The same JSON schema with its `$defs` inlined and `T | None` written `type: [T, "null"]`.

    Clients validate every structured result against it (the Python SDK with `jsonschema`, whose
    `$ref` resolution and `anyOf` branches dominate that cost). A recursive schema is returned
    unchanged."""
    defs = cast("dict[str, Any]", schema.get("$defs") or {})
    try:
        return cast("dict[str, Any]", _inline(schema, defs, ()))
    except _Recursive:
        return schema
