"""A metric over time as a chart: in the terminal (plotext) or as a PNG (matplotlib).

plotext is pure Python and small, so it is a dependency; matplotlib is not (it pulls numpy
builds, fonts and pillow that a Pi gateway need not carry) and comes with the optional
extra `fieldgate[plot]`.
"""

from __future__ import annotations

import importlib
import shutil
from datetime import UTC, datetime
from pathlib import Path

import plotext as plt

from gateway.query.canned import MetricSeries
from gateway.query.client import QueryError
from gateway.query.render import format_age

_DATE_FORM = "d/m H:M"   # plotext's date tokens; UTC, like every time Fieldgate prints


def title(data: MetricSeries) -> str:
    return (f"{data.device} {data.metric}, last {format_age(data.since_s)} "
            f"(mean per {format_age(data.step_s)}, UTC)")


def terminal_chart(data: MetricSeries, *, width: int | None = None, height: int = 20,
                   color: bool = False) -> str:
    """The chart as text; alerts fired/resolved are vertical lines."""
    if width is None:
        width = min(shutil.get_terminal_size((100, 24)).columns, 160)
    plt.clear_figure()
    plt.date_form(_DATE_FORM)
    dates = [_date(ms) for ms in data.times_ms]
    plt.plot(dates, list(data.values), marker="braille")
    for ms, kind in data.markers:
        if data.times_ms[0] <= ms <= data.times_ms[-1]:
            plt.vline(_date(ms), "red" if kind.endswith("fired") else "green")
    plt.title(title(data))
    plt.plotsize(width, height)
    plt.theme("pro" if color else "clear")
    text: str = plt.build()
    plt.clear_figure()
    if data.markers:
        shown = ", ".join(f"{kind} {datetime.fromtimestamp(ms / 1000, UTC):%H:%M}"
                          for ms, kind in data.markers)
        text += f"\nalerts: {shown}\n"
    return text


def _date(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%d/%m %H:%M")


def write_png(data: MetricSeries, path: Path) -> None:
    """Write the chart as a PNG; QueryError with the install hint if matplotlib is missing."""
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ImportError:
        raise QueryError("--png needs matplotlib: pip install 'fieldgate[plot]' (the terminal "
                         "chart needs nothing more; leave out --png)") from None
    matplotlib.use("Agg")  # no display on a gateway or in CI
    pyplot = importlib.import_module("matplotlib.pyplot")
    fig, ax = pyplot.subplots(figsize=(10, 4), dpi=100)
    try:
        times = [datetime.fromtimestamp(ms / 1000, UTC) for ms in data.times_ms]
        ax.plot(times, data.values, linewidth=1.2, label=data.metric)
        for ms, kind in data.markers:
            ax.axvline(datetime.fromtimestamp(ms / 1000, UTC), linestyle="--", linewidth=0.8,
                       color="tab:red" if kind.endswith("fired") else "tab:green")
        dates = importlib.import_module("matplotlib.dates")
        ax.xaxis.set_major_formatter(dates.DateFormatter("%d/%m %H:%M", tz=UTC))
        ax.set_title(title(data))
        ax.set_ylabel(data.metric)
        ax.grid(alpha=0.3)
        fig.autofmt_xdate()
        fig.tight_layout()
        fig.savefig(path, format="png")
    except OSError as err:
        raise QueryError(f"cannot write {str(path)!r}: {err.strerror}") from None
    finally:
        pyplot.close(fig)
