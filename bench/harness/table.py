"""The summary tables the benches print (others and the README quote their rows, so the
columns stay as they are)."""

from __future__ import annotations

from typing import Any


class Table:
    """Rows of scenario, value, unit, baseline, ratio, target and PASS/FAIL; the ratio is
    value / baseline unless given."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def row(self, scenario: str, value: Any, unit: str, base: Any = None, target: str = "",
            ok: bool | None = None, ratio: float | None = None) -> None:
        if ratio is None and isinstance(value, (int, float)) and \
                isinstance(base, (int, float)) and base:
            ratio = value / base
        self.rows.append({"scenario": scenario, "value": value, "unit": unit, "baseline": base,
                          "ratio": ratio, "target": target,
                          "pass": None if ok is None else bool(ok)})

    def failed(self) -> bool:
        return any(rw["pass"] is False for rw in self.rows)

    def print(self) -> None:
        head = f"{'scenario':<34} {'value':>10} {'unit':<6} {'baseline':>10} {'ratio':>6} " \
               f"{'target':<10} {'result':<6}"
        print(head)
        print("-" * len(head))
        for rw in self.rows:
            res = "" if rw["pass"] is None else ("PASS" if rw["pass"] else "FAIL")
            ratio = "-" if rw["ratio"] is None else f"{rw['ratio']:.2f}"
            print(f"{rw['scenario']:<34} {_num(rw['value']):>10} {rw['unit']:<6} "
                  f"{_num(rw['baseline']):>10} {ratio:>6} {rw['target']:<10} {res:<6}")


def _num(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.1f}"
    return str(x)


def print_measures(rows: list[tuple[str, str, str]]) -> None:
    """A measure / value / target table (bench_engine's)."""
    print(f"{'measure':44} {'value':>14}  target")
    for label, value, target in rows:
        print(f"{label:44} {value:>14}  {target}")


def ms(x: float | None) -> float | None:
    """Seconds to milliseconds, None kept."""
    return None if x is None else x * 1000


def fmt_ms(x: float | None) -> str:
    """Seconds as whole milliseconds for a progress line, "-" for None."""
    return "-" if x is None else f"{x * 1000:.0f}"
