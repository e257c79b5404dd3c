"""Config problems as users read them: one line per problem, the field's dotted path first."""

from __future__ import annotations

from pydantic import ValidationError


def validation_problems(err: ValidationError, *, unknown: str = "unknown field",
                        missing: str = "required") -> list[str]:
    """One line per pydantic error: the field's dotted path, what is wrong, and the fix.
    ``unknown`` and ``missing`` say what to do about an unknown or a missing field."""
    lines = []
    for item in err.errors():
        where = ".".join(str(p) for p in item["loc"]) or "(top level)"
        msg = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            msg = unknown
        elif item["type"] == "missing":
            msg = missing
        lines.append(f"{where}: {msg}")
    return lines
