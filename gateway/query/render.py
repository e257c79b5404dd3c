"""Query answers as a table for people, CSV for spreadsheets, JSON for scripts."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import orjson

from gateway.query.client import Series


class Format(StrEnum):
    TABLE = "table"
    CSV = "csv"
    JSON = "json"


@dataclass(frozen=True, slots=True)
class Table:
    """Rows under named columns; a `time` column holds epoch milliseconds."""

    columns: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]


def flatten(series: Sequence[Series]) -> Table:
    """Many series (GROUP BY tags, several measurements) as one table.

    Columns: time first, then the measurement when there is more than one, then the group
    tags, then the value columns in the order InfluxDB gave them.
    """
    names = sorted({s.name for s in series})
    tag_keys = sorted({k for s in series for k in s.tags})
    values: list[str] = []
    for s in series:
        values.extend(c for c in s.columns if c not in values)
    lead = ["time"] if "time" in values else []
    if len(names) > 1:
        lead.append("measurement")
    columns = (*lead, *tag_keys, *(c for c in values if c != "time"))
    rows: list[tuple[Any, ...]] = []
    for s in series:
        index = {c: i for i, c in enumerate(s.columns)}
        for raw in s.values:
            row: list[Any] = []
            for col in columns:
                if col == "measurement":
                    row.append(s.name)
                elif col in s.tags and col not in index:
                    row.append(s.tags[col])
                elif col in index:
                    row.append(raw[index[col]])
                else:
                    row.append(None)
            rows.append(tuple(row))
    return Table(columns=columns, rows=tuple(rows))


def format_time(ms: Any) -> str:
    """Epoch ms -> RFC 3339 in UTC, with milliseconds only when there are some."""
    if not isinstance(ms, int | float) or isinstance(ms, bool):
        return "" if ms is None else str(ms)
    when = datetime.fromtimestamp(ms / 1000, UTC)
    text = when.strftime("%Y-%m-%dT%H:%M:%S")
    if int(ms) % 1000:
        text += f".{int(ms) % 1000:03d}"
    return text + "Z"


def format_age(seconds: float) -> str:
    """A person's reading of an age: 42s, 3m 20s, 5h 2m, 3d 4h."""
    seconds = max(0, int(seconds))
    for unit, size, sub_unit, sub_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60),
                                           ("m", 60, "s", 1)):
        if seconds >= size:
            rest = (seconds % size) // sub_size
            return f"{seconds // size}{unit}" + (f" {rest}{sub_unit}" if rest else "")
    return f"{seconds}s"


def _cell(column: str, value: Any) -> str:
    if column == "time":
        return format_time(value)
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isfinite(value) and value == int(value) and abs(value) < 1e15:
            return str(int(value))
        return f"{value:.6g}" if abs(value) >= 1e6 or abs(value) < 1e-3 else \
            f"{round(value, 4):g}"
    return str(value)


def _numeric(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def render(table: Table, fmt: Format) -> str:
    if fmt is Format.JSON:
        rows = [{c: (format_time(v) if c == "time" else v) for c, v in zip(table.columns, row,
                                                                           strict=True)}
                for row in table.rows]
        return orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode() + "\n"
    if fmt is Format.CSV:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(table.columns)
        for row in table.rows:
            writer.writerow(["" if v is None else (format_time(v) if c == "time" else v)
                             for c, v in zip(table.columns, row, strict=True)])
        return out.getvalue()
    cells = [[_cell(c, v) for c, v in zip(table.columns, row, strict=True)]
             for row in table.rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(table.columns)]
    right = [c != "time" and any(_numeric(row[i]) for row in table.rows)
             for i, c in enumerate(table.columns)]

    def line(parts: Sequence[str]) -> str:
        return "  ".join(p.rjust(w) if r else p.ljust(w)
                         for p, w, r in zip(parts, widths, right, strict=True)).rstrip()

    lines = [line(table.columns), line(["-" * w for w in widths])]
    lines.extend(line(r) for r in cells)
    return "\n".join(lines) + "\n"
