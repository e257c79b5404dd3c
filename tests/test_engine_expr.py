"""The expression parser: precedence, types, every function, and errors with columns."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.engine import expr as ex


def test_precedence_and_associativity():
    assert ex.render(ex.parse("1 + 2 * 3 > 4 - 1 - 1")) == "((1 + (2 * 3)) > ((4 - 1) - 1))"
    assert ex.render(ex.parse("a > 1 or b > 2 and not c > 3")) == \
        "((a > 1) or ((b > 2) and not ((c > 3))))"
    assert ex.render(ex.parse("-(a + 1) * 2 == 4")) == "((-(a + 1) * 2) == 4)"


@pytest.mark.parametrize("func", sorted(ex.WINDOW_FUNCS))
def test_every_window_function_parses(func):
    text = f"{func}(temp, 30s)" + ("" if func == "absent" else " > 1")
    node = ex.parse(text)
    (window,) = ex.windows(node)
    assert (window.func, window.metric, window.seconds) == (func, "temp", 30.0)
    assert window.text == f"{func}(temp, 30s)"


@pytest.mark.parametrize(("text", "seconds"), [("500ms", 0.5), ("30s", 30), ("5m", 300),
                                               ("1h", 3600), ("1.5m", 90)])
def test_durations(text, seconds):
    (window,) = ex.windows(ex.parse(f"avg(t, {text}) > 0"))
    assert window.seconds == seconds


def test_bare_metric_is_last_over_lookback():
    (window,) = ex.windows(ex.parse("temp > 3", lookback=120))
    assert (window.func, window.metric, window.seconds) == ("last", "temp", 120)


def test_abs_and_dotted_metric_names():
    node = ex.parse("abs(room.temp - avg(room.temp, 1m)) >= 2.5e1")
    assert [w.metric for w in ex.windows(node)] == ["room.temp", "room.temp"]


def test_headline_reports_first_comparison():
    head, threshold = ex.headline(ex.parse("avg(temp, 60s) > 30 and hum < 20"))
    assert isinstance(head, ex.Window) and head.func == "avg"
    assert threshold == "> 30"
    assert ex.headline(ex.parse("absent(temp, 30s)")) == (None, "")


@pytest.mark.parametrize(("text", "column", "problem"), [
    ("avg(temp, 60s)) > 30", 15, "unexpected ')'"),
    ("avg(temp) > 1", 9, "expected ','"),
    ("avg(temp, 60) > 1", 11, "needs a duration"),
    ("avg(temp, 0s) > 1", 11, "longer than zero"),
    ("avg(3, 1m) > 1", 5, "needs a metric name"),
    ("temp > ", 8, "ends too early"),
    ("temp $ 3", 6, "unexpected character '$'"),
    ("avg(t, 1m) and 3 > 1", 1, "'and' needs a condition"),
    ("temp + (hum > 3) > 1", 6, "'+' needs a number"),
    ("a > b > c", 7, "do not chain"),
    ("temp + 1", 1, "must be a condition"),
    ("not temp", 1, "'not' needs a condition"),
    ("30s > 1", 1, "only goes inside a function"),
    ("abs(a > 1) > 0", 5, "abs() needs a number"),
    ("(a > 1", 7, "expected ')'"),
])
def test_errors_name_column_and_problem(text, column, problem):
    with pytest.raises(ex.ExprError) as info:
        ex.parse(text)
    assert info.value.column == column, str(info.value)
    assert problem in str(info.value)
    assert repr(text) in str(info.value)


def test_never_evaluates_python():
    with pytest.raises(ex.ExprError):
        ex.parse("__import__('os').system('true') > 0")


# -- property: rendering a random tree and parsing it back gives the same tree ----------

_metric = st.sampled_from(["temp", "hum", "vib", "e.total"])
_window = st.builds(
    lambda f, m, n, u: ex.Window(f, m, n * {"s": 1.0, "m": 60.0}[u], f"{f}({m}, {n}{u})"),
    st.sampled_from(sorted(f for f, k in ex.WINDOW_FUNCS.items() if k == "num")),
    _metric, st.integers(1, 90), st.sampled_from(["s", "m"]))
_num = st.recursive(
    st.one_of(st.integers(0, 1000).map(lambda v: ex.Num(float(v))), _window,
              _metric.map(lambda m: ex.Window("last", m, 300.0, m))),
    lambda inner: st.one_of(
        st.builds(ex.Binary, st.sampled_from("+-*/"), inner, inner),
        st.builds(ex.Abs, inner), st.builds(ex.Neg, inner)),
    max_leaves=6)
_absent = st.builds(lambda m, n: ex.Window("absent", m, float(n), f"absent({m}, {n}s)"),
                    _metric, st.integers(1, 90))
_bool = st.recursive(
    st.one_of(st.builds(ex.Binary, st.sampled_from(ex.COMPARATORS), _num, _num), _absent),
    lambda inner: st.one_of(st.builds(ex.Logic, st.sampled_from(["and", "or"]), inner, inner),
                            st.builds(ex.Not, inner)),
    max_leaves=4)


@given(_bool)
def test_render_then_parse_round_trips(tree):
    assert ex.parse(ex.render(tree)) == tree


@given(st.text(max_size=30))
def test_garbage_is_rejected_cleanly(text):
    try:
        ex.parse(text)
    except ex.ExprError as exc:
        column = exc.column
    else:
        return
    assert 1 <= column <= len(text) + 1
