"""Drawing a status Snapshot with rich: a header (links, rates, sink depths), a row per
device (values, a sparkline of the last minute, actuators) and the newest events."""

from __future__ import annotations

import time
from collections.abc import Sequence

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from fieldkit.units import format_size
from gateway.status.state import WINDOW, Actuator, DeviceRow, Snapshot, Tone

SPARKS = "▁▂▃▄▅▆▇█"
_STYLE = {Tone.BAD: "bold red", Tone.GOOD: "green", Tone.WARN: "yellow", Tone.INFO: "cyan",
          Tone.PLAIN: ""}
# Lines the header and the table's frame take; the rest of the screen is shared by device
# rows and the feed.
_CHROME = 9
# Feed lines shown at least (and in a one-off snapshot).
_MIN_FEED = 6
_ONCE_FEED = 12


def sparkline(values: Sequence[float | None], width: int) -> str:
    """``values`` (oldest first, None where nothing came) squeezed into ``width`` characters,
    each the mean of its share, scaled between the minimum and the maximum; a gap is a
    space."""
    if width <= 0 or not values:
        return ""
    cells: list[float | None] = []
    for i in range(width):
        part = [v for v in values[i * len(values) // width:(i + 1) * len(values) // width]
                if v is not None]
        cells.append(sum(part) / len(part) if part else None)
    present = [c for c in cells if c is not None]
    if not present:
        return " " * width
    low, high = min(present), max(present)
    span = high - low
    out = []
    for c in cells:
        if c is None:
            out.append(" ")
        elif span <= 0:
            out.append(SPARKS[len(SPARKS) // 2])
        else:
            out.append(SPARKS[min(len(SPARKS) - 1, int((c - low) / span * len(SPARKS)))])
    return "".join(out)


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    if seconds < 129600:
        return f"{seconds / 3600:.0f}h"
    return f"{seconds / 86400:.0f}d"


def _clock(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(ts))


def _value(value: float) -> str:
    if value.is_integer() and abs(value) < 1e6:
        return f"{value:.0f}"
    return f"{value:.4g}" if abs(value) >= 1e4 or abs(value) < 0.01 else f"{value:.1f}"


def _header(snap: Snapshot) -> RenderableType:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    m = snap.metrics
    links = Text()
    if m is None:
        links.append(f"? metrics unreachable: {snap.metrics_error}", style="bold red")
    else:
        for name in sorted(m.links, key=lambda n: ("site", "cloud", "influx").index(n)
                           if n in ("site", "cloud", "influx") else 9):
            up = m.links[name]
            links.append("● " if up else "○ ", style="green" if up else "bold red")
            links.append(f"{name} {'up' if up else 'DOWN'}   ",
                         style="" if up else "bold red")
    grid.add_row("links", links)
    if m is not None:
        rate = "-" if snap.readings_per_s is None else f"{snap.readings_per_s:,.1f}/s"
        flow = Text(f"{m.readings_total:,.0f} readings ({rate})   ")
        flow.append(f"alerts firing {m.alerts_firing:.0f}   ",
                    style="bold red" if m.alerts_firing else "")
        flow.append(f"dead letters {m.dead_letters_total:,.0f}   ",
                    style="yellow" if m.dead_letters_total else "")
        flow.append(f"dropped {m.dropped_total:,.0f}", style="bold red" if m.dropped_total else "")
        grid.add_row("flow", flow)
        depth = Text(f"{format_size(int(m.log_bytes))}" + (" FULL" if m.log_full else "")
                     + "   ", style="bold red" if m.log_full else "")
        for sink, n in sorted(m.depths.items()):
            oldest = snap.cursors_oldest.get(sink)
            waited = f" (oldest {_age(snap.time - oldest)})" if n and oldest else ""
            depth.append(f"{sink} {n:,} waiting{waited}   ", style="yellow" if n else "")
        grid.add_row("log", depth)
    for label, value in snap.notes:
        grid.add_row(label, Text.from_markup(value))
    title = f"Fieldgate {snap.gateway_id}".strip() + f" · {_clock(snap.time)} UTC"
    return Panel(grid, title=title, title_align="left", border_style="blue")


def _actuators(items: Sequence[Actuator]) -> Text:
    out = Text()
    for a in items:
        style = {"acknowledged": "bold green", "sent": "yellow", "rejected": "bold red",
                 "no answer": "red"}.get(a.status, "")
        mark = {"acknowledged": "✓", "sent": "…", "rejected": "✗", "no answer": "?"}.get(
            a.status, "")
        out.append(f"{a.action} {a.state}{mark} ", style=style)
    return out


def _devices(snap: Snapshot, width: int, rows: int) -> RenderableType:
    names = snap.metric_names[:max(1, (width - 36) // 16)]
    spark = max(6, min(30, (width - 36) // max(1, len(names)) - 9))
    table = Table(expand=False, box=None, padding=(0, 1), header_style="bold",
                  title=f"devices: latest value, the last {WINDOW} s", title_justify="left",
                  title_style="bold")
    table.add_column("device", style="bold", no_wrap=True)
    for name in names:
        table.add_column(name, no_wrap=True)
    table.add_column("alerts", no_wrap=True, style="bold red")
    table.add_column("actuators", no_wrap=True)
    table.add_column("seen", justify="right", no_wrap=True)
    shown: Sequence[DeviceRow] = snap.devices[:rows]
    for dev in shown:
        cells: list[RenderableType] = [Text(dev.device, style="bold red" if dev.firing else "")]
        for name in names:
            if name not in dev.values:
                cells.append(Text("-"))
                continue
            cell = Text(f"{_value(dev.values[name]):>7} ")
            cell.append(sparkline(dev.history.get(name, ()), spark), style="cyan")
            cells.append(cell)
        cells.append(Text(" ".join(dev.firing)))
        cells.append(_actuators(dev.actuators))
        cells.append(Text(_age(snap.time - dev.last_seen) if dev.last_seen else "-"))
        table.add_row(*cells)
    if not snap.devices:
        table.add_row(Text("no readings in the last minute", style="dim"),
                      *([""] * (len(names) + 3)))
    hidden = len(snap.devices) - len(shown)
    more = len(snap.metric_names) - len(names)
    caption = ", ".join(
        part for part in (f"{hidden} more device(s)" if hidden > 0 else "",
                          f"{more} more metric(s)" if more > 0 else "") if part)
    if caption:
        table.caption = f"+ {caption} (a wider or taller terminal shows them)"
    return table


def _feed(snap: Snapshot, lines: int) -> RenderableType:
    text = Text()
    items = snap.feed[-lines:] if lines > 0 else ()
    for i, item in enumerate(items):
        if i:
            text.append("\n")
        text.append(f"{_clock(item.time)}  ", style="dim")
        text.append(f"{item.kind:<9}", style=_STYLE[item.tone] or "bold")
        text.append(item.text, style=_STYLE[item.tone] if item.tone is Tone.BAD else "")
    if not items:
        text.append("no events yet", style="dim")
    return Panel(text, title="events (UTC)", title_align="left", border_style="blue")


def render(snap: Snapshot, *, width: int, height: int | None) -> RenderableType:
    """The whole view for a terminal ``width`` wide; ``height`` None: no limit (a one-off
    snapshot prints every device)."""
    if height is None:
        rows, feed = len(snap.devices), _ONCE_FEED
    else:
        room = max(0, height - _CHROME - len(snap.notes))
        rows = max(1, min(len(snap.devices), room - _MIN_FEED))
        feed = max(_MIN_FEED, room - rows) if room > rows else 2
    return Group(_header(snap), _devices(snap, width, rows), _feed(snap, feed))
