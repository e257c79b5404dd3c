"""Topic templates: matching, specificity, and the filters we subscribe to."""

from __future__ import annotations

from gateway.config import PayloadFormat, Subscription
from gateway.ingest.topics import TopicTemplates


def _t(*topics: str) -> TopicTemplates:
    return TopicTemplates([
        Subscription(topic=t, format=PayloadFormat.NUMBER if "{metric}" in t else
                     PayloadFormat.JSON) for t in topics
    ])


def test_covered_filters_are_not_subscribed_twice():
    # One copy per message from the broker: sensors/+/telemetry is inside sensors/+/+.
    templates = _t("sensors/{device}/telemetry", "sensors/{device}/{metric}")
    assert templates.filters == [("sensors/+/+", None)]
    m = templates.match("sensors/gh-1/telemetry")
    assert m is not None and m.format is PayloadFormat.JSON and m.device == "gh-1"
    m = templates.match("sensors/gh-1/temp")
    assert m is not None and m.format is PayloadFormat.NUMBER and m.metric == "temp"


def test_partial_overlaps_get_subscription_identifiers():
    # a/y/x matches both and neither filter covers the other: the broker sends two copies,
    # and the identifiers say which copy belongs to the template that wins.
    templates = _t("a/{device}/x", "a/y/{device}")
    assert templates.filters == [("a/+/x", 1), ("a/y/+", 2)]
    m = templates.match("a/y/x")
    assert m is not None and m.sub_id == 1  # first in config order when equally specific


def test_a_covered_template_takes_the_identifier_of_its_covering_filter():
    templates = _t("s/{device}/telemetry", "s/{device}/{metric}", "{device}/x/telemetry")
    assert templates.filters == [("+/x/telemetry", 1), ("s/+/+", 2)]
    m = templates.match("s/gh/telemetry")
    assert m is not None and m.format is PayloadFormat.JSON
    assert m.sub_id == 2  # the copy the broker sends for s/+/+ is the one to process


def test_disjoint_filters_carry_no_identifiers():
    templates = _t("site1/{device}/telemetry", "site2/{device}/{metric}")
    assert templates.filters == [("site1/+/telemetry", None), ("site2/+/+", None)]


def test_unknown_and_empty_levels_do_not_match():
    templates = _t("sensors/{device}/telemetry")
    assert templates.match("sensors/a/b") is None
    assert templates.match("sensors//telemetry") is None
    assert templates.match("other/a/telemetry") is None
