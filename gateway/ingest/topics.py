"""Topic templates such as ``sensors/{device}/{metric}``: subscription filters and matching."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.config import PayloadFormat, Subscription

# Topics seen recently map straight to their match: a site has a bounded set of devices, so
# this is nearly always a hit. The cap bounds memory against a flood of random topics; when
# it is reached the cache is cleared (cheap, and refilled at once by live devices).
_CACHE_MAX = 65_536
# Only topics up to this length are cached: MQTT allows 65,535-byte topics, and a flood of
# long random ones would otherwise hold gigabytes. Real topics are far shorter.
_CACHE_TOPIC_MAX = 256


@dataclass(frozen=True, slots=True)
class TopicMatch:
    device: str
    metric: str | None
    format: PayloadFormat
    sub_id: int  # MQTT v5 subscription identifier of the template (1-based)


@dataclass(frozen=True, slots=True)
class _Template:
    levels: tuple[str, ...]
    format: PayloadFormat
    sub_id: int
    device_at: int
    metric_at: int | None

    @property
    def literal_count(self) -> int:
        return sum(1 for level in self.levels if not level.startswith("{"))


class TopicTemplates:
    """Matches concrete topics against the configured templates.

    When several templates match a topic, the one with more literal levels wins, so
    ``sensors/{device}/telemetry`` takes ``sensors/gh-1/telemetry`` before
    ``sensors/{device}/{metric}`` does.
    """

    def __init__(self, subscriptions: list[Subscription]) -> None:
        # A broker sends one copy of a message per matching subscription, so a filter that
        # another one covers (sensors/+/telemetry under sensors/+/+) is not subscribed to:
        # match() sorts templates out locally. Kept filters that still overlap in part get
        # subscription identifiers (1-based position in self._filters); a template's copy is
        # the one for the first kept filter that covers it. Without overlaps no identifiers
        # are sent, so PUBLISH packets carry no properties (our fast path).
        all_filters = {filter_of(tuple(s.topic.split("/"))) for s in subscriptions}
        self._filters = sorted(f for f in all_filters
                               if not any(g != f and _covers(g, f) for g in all_filters))
        self._use_ids = any(_overlaps(f, g) for f in self._filters for g in self._filters
                            if f < g)
        templates = []
        for sub in subscriptions:
            levels = tuple(sub.topic.split("/"))
            own = filter_of(levels)
            sub_id = next(i for i, f in enumerate(self._filters, 1) if _covers(f, own))
            templates.append(
                _Template(
                    levels=levels,
                    format=sub.format,
                    sub_id=sub_id,
                    device_at=levels.index("{device}"),
                    metric_at=levels.index("{metric}") if "{metric}" in levels else None,
                )
            )
        self._templates = sorted(templates, key=lambda t: -t.literal_count)
        self._cache: dict[str, TopicMatch | None] = {}

    @property
    def filters(self) -> list[tuple[str, int | None]]:
        """(MQTT filter, subscription identifier or None) to subscribe to."""
        return [(f, i if self._use_ids else None) for i, f in enumerate(self._filters, 1)]

    def match(self, topic: str) -> TopicMatch | None:
        try:
            return self._cache[topic]
        except KeyError:
            pass
        found = self._match(topic)
        if len(topic) > _CACHE_TOPIC_MAX:
            return found
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()
        self._cache[topic] = found
        return found

    def _match(self, topic: str) -> TopicMatch | None:
        levels = topic.split("/")
        for template in self._templates:
            if len(levels) != len(template.levels):
                continue
            if all(
                t.startswith("{") or t == level
                for t, level in zip(template.levels, levels, strict=True)
            ):
                device = levels[template.device_at]
                metric = levels[template.metric_at] if template.metric_at is not None else None
                if not device or metric == "":
                    return None
                return TopicMatch(device=device, metric=metric, format=template.format,
                                  sub_id=template.sub_id)
        return None


def filter_of(levels: tuple[str, ...] | list[str]) -> str:
    return "/".join("+" if level.startswith("{") else level for level in levels)


def _covers(general: str, specific: str) -> bool:
    """Every topic that ``specific`` matches, ``general`` matches too (``+`` filters only)."""
    g, s = general.split("/"), specific.split("/")
    return len(g) == len(s) and all(a in ("+", b) for a, b in zip(g, s, strict=True))


def _overlaps(a: str, b: str) -> bool:
    x, y = a.split("/"), b.split("/")
    return len(x) == len(y) and all(p == q or "+" in (p, q) for p, q in zip(x, y, strict=True))
