"""The rule expression language: a hand-written recursive-descent parser (never ``eval``).

Grammar, loosest binding first::

    expr    := or
    or      := and ("or" and)*
    and     := not ("and" not)*
    not     := "not" not | compare
    compare := sum (("<" | "<=" | ">" | ">=" | "==" | "!=") sum)?
    sum     := product (("+" | "-") product)*
    product := unary (("*" | "/") unary)*
    unary   := "-" unary | atom
    atom    := NUMBER | METRIC | FUNC "(" METRIC "," DURATION ")" | "abs" "(" sum ")"
             | "(" expr ")"

Every node is typed ``num`` or ``bool`` at parse time, so ``avg(t, 1m) and 3`` is an error
with a column instead of a surprise at evaluation.

Hostile input is bounded before it costs anything: text longer than ``MAX_LENGTH`` is
refused unread, and a tree deeper than ``MAX_DEPTH`` (parentheses, ``not``, ``-``, ``abs``
and every operator of a chain count) is refused while parsing, so neither the parser nor
anything that walks the tree later (evaluation, rendering) can exhaust the Python stack.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from fieldkit.units import parse_duration

# Functions over a window of one metric's readings; the value says whether they give a
# number or a truth value. This table is the one place a window function is registered.
WINDOW_FUNCS: dict[str, Literal["num", "bool"]] = {
    "last": "num", "avg": "num", "min": "num", "max": "num", "sum": "num", "count": "num",
    "std": "num", "delta": "num", "rate": "num", "zscore": "num", "absent": "bool",
}
COMPARATORS = ("<=", ">=", "==", "!=", "<", ">")
# Longest expression text: a real rule is a line or two; this bounds tokenising work.
MAX_LENGTH = 2000
# Deepest expression tree. Each level costs ~8 parser frames and one frame in every later
# tree walk, so 50 stays far below Python's recursion limit (1000) while no sensible rule
# comes near it (``a + b + c`` is 3 levels, ``not (x > 1)`` is 3).
MAX_DEPTH = 50
# Longest window: rings keep 10-25 buckets per window whatever its length, so this bounds
# nothing in memory; it keeps a typo such as 99999999d from meaning "forever".
MAX_WINDOW = 7 * 86400.0
KEYWORDS = frozenset({"and", "or", "not", "abs"})

_TOKEN_RE = re.compile(
    r"\s*(?:(?P<dur>\d+(?:\.\d+)?(?:ms|s|m|h|d))(?![A-Za-z0-9_])"
    r"|(?P<num>\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)"
    r"|(?P<name>[A-Za-z_][A-Za-z0-9_.]*)"
    r"|(?P<op><=|>=|==|!=|[-+*/<>(),]))"
)


class ExprError(ValueError):
    """An expression does not parse; ``column`` is 1-based."""

    def __init__(self, text: str, column: int, problem: str) -> None:
        self.text = text
        self.column = column
        self.problem = problem
        super().__init__(f"{problem} at column {column} in {text!r}")


@dataclass(frozen=True, slots=True)
class Num:
    value: float


@dataclass(frozen=True, slots=True)
class Window:
    """``func(metric, seconds)``; a bare metric name is ``last(metric, lookback)``."""

    func: str
    metric: str
    seconds: float
    text: str


@dataclass(frozen=True, slots=True)
class Abs:
    arg: Node


@dataclass(frozen=True, slots=True)
class Neg:
    arg: Node


@dataclass(frozen=True, slots=True)
class Binary:
    op: str  # + - * / and comparators
    left: Node
    right: Node


@dataclass(frozen=True, slots=True)
class Logic:
    op: str  # and, or
    left: Node
    right: Node


@dataclass(frozen=True, slots=True)
class Not:
    arg: Node


Node = Num | Window | Abs | Neg | Binary | Logic | Not


@dataclass(frozen=True, slots=True)
class _Tok:
    kind: str
    text: str
    col: int


def _tokenize(text: str) -> list[_Tok]:
    tokens: list[_Tok] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN_RE.match(text, pos)
        if m is None or m.lastgroup is None:
            bad = len(text) - len(text[pos:].lstrip()) + 1
            raise ExprError(text, bad, f"unexpected character {text[bad - 1]!r}")
        tokens.append(_Tok(m.lastgroup, m.group(m.lastgroup), m.start(m.lastgroup) + 1))
        pos = m.end()
    tokens.append(_Tok("end", "", len(text) + 1))
    return tokens


class _Parser:
    def __init__(self, text: str, lookback: float) -> None:
        self.text = text
        self.lookback = lookback
        self.toks = _tokenize(text)
        self.i = 0
        self.nesting = 0

    def deeper(self, tok: _Tok) -> None:
        """Enter one more level of parentheses/not/minus/abs; refuse past MAX_DEPTH."""
        self.nesting += 1
        if self.nesting > MAX_DEPTH:
            raise self.fail(tok, f"expression nested too deeply (more than {MAX_DEPTH} "
                            "levels of parentheses, not, -, abs)")

    def chain(self, node: Node, tok: _Tok) -> Node:
        """Refuse a tree deeper than MAX_DEPTH, e.g. a sum of thousands of terms."""
        if depth(node) + self.nesting > MAX_DEPTH:
            raise self.fail(tok, f"expression nested too deeply (more than {MAX_DEPTH} "
                            "levels of operators and parentheses)")
        return node

    def peek(self) -> _Tok:
        return self.toks[self.i]

    def take(self) -> _Tok:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def fail(self, tok: _Tok, problem: str) -> ExprError:
        return ExprError(self.text, tok.col, problem)

    def expect(self, text: str) -> _Tok:
        tok = self.take()
        if tok.text != text:
            found = repr(tok.text) if tok.kind != "end" else "end of expression"
            raise self.fail(tok, f"expected {text!r}, found {found}")
        return tok

    def typed(self, node: Node, want: str, tok: _Tok, where: str) -> Node:
        if kind_of(node) != want:
            article = "a number" if want == "num" else "a condition"
            raise self.fail(tok, f"{where} needs {article}")
        return node

    def parse_or(self) -> Node:
        tok = self.peek()
        left = self.parse_and()
        while self.peek().text == "or":
            op = self.take()
            right = self.parse_and()
            self.typed(left, "bool", tok, "'or'")
            left = self.chain(Logic("or", left, self.typed(right, "bool", op, "'or'")), op)
        return left

    def parse_and(self) -> Node:
        tok = self.peek()
        left = self.parse_not()
        while self.peek().text == "and":
            op = self.take()
            right = self.parse_not()
            self.typed(left, "bool", tok, "'and'")
            left = self.chain(Logic("and", left, self.typed(right, "bool", op, "'and'")), op)
        return left

    def parse_not(self) -> Node:
        if self.peek().text == "not":
            tok = self.take()
            self.deeper(tok)
            node = Not(self.typed(self.parse_not(), "bool", tok, "'not'"))
            self.nesting -= 1
            return node
        return self.parse_compare()

    def parse_compare(self) -> Node:
        tok = self.peek()
        left = self.parse_sum()
        if self.peek().text in COMPARATORS:
            op = self.take()
            right = self.parse_sum()
            self.typed(left, "num", tok, f"{op.text!r}")
            left = self.chain(
                Binary(op.text, left, self.typed(right, "num", op, f"{op.text!r}")), op)
            if self.peek().text in COMPARATORS:
                raise self.fail(self.peek(), "comparisons do not chain; join them with 'and'")
        return left

    def parse_sum(self) -> Node:
        tok = self.peek()
        left = self.parse_product()
        while self.peek().text in ("+", "-"):
            op = self.take()
            right = self.parse_product()
            self.typed(left, "num", tok, f"{op.text!r}")
            left = self.chain(
                Binary(op.text, left, self.typed(right, "num", op, f"{op.text!r}")), op)
        return left

    def parse_product(self) -> Node:
        tok = self.peek()
        left = self.parse_unary()
        while self.peek().text in ("*", "/"):
            op = self.take()
            right = self.parse_unary()
            self.typed(left, "num", tok, f"{op.text!r}")
            left = self.chain(
                Binary(op.text, left, self.typed(right, "num", op, f"{op.text!r}")), op)
        return left

    def parse_unary(self) -> Node:
        if self.peek().text == "-":
            tok = self.take()
            self.deeper(tok)
            node = Neg(self.typed(self.parse_unary(), "num", tok, "'-'"))
            self.nesting -= 1
            return node
        return self.parse_atom()

    def parse_atom(self) -> Node:
        tok = self.take()
        if tok.kind == "num":
            return Num(float(tok.text))
        if tok.text == "(":
            self.deeper(tok)
            node = self.parse_or()
            self.expect(")")
            self.nesting -= 1
            return node
        if tok.kind == "name" and tok.text == "abs":
            self.deeper(tok)
            self.expect("(")
            arg_tok = self.peek()
            arg = self.typed(self.parse_or(), "num", arg_tok, "abs()")
            self.expect(")")
            self.nesting -= 1
            return Abs(arg)
        if tok.kind == "name" and tok.text in WINDOW_FUNCS and self.peek().text == "(":
            return self.parse_window(tok)
        if tok.kind == "name" and tok.text not in KEYWORDS:
            return Window("last", tok.text, self.lookback, tok.text)
        if tok.kind == "end":
            raise self.fail(tok, "expression ends too early")
        if tok.kind == "dur":
            raise self.fail(tok, f"a duration ({tok.text}) only goes inside a function")
        raise self.fail(tok, f"unexpected {tok.text!r}")

    def parse_window(self, name: _Tok) -> Window:
        self.expect("(")
        metric = self.take()
        if metric.kind != "name" or metric.text in KEYWORDS:
            raise self.fail(metric, f"{name.text}() needs a metric name first")
        self.expect(",")
        dur = self.take()
        if dur.kind != "dur":
            raise self.fail(dur, f"{name.text}() needs a duration such as 30s, 5m or 1h")
        seconds = parse_duration(dur.text)
        if seconds <= 0:
            raise self.fail(dur, "a window must be longer than zero")
        if seconds > MAX_WINDOW:
            raise self.fail(dur, "a window can be at most 7d")
        end = self.expect(")")
        return Window(name.text, metric.text, seconds, self.text[name.col - 1:end.col])


def kind_of(node: Node) -> Literal["num", "bool"]:
    """``num`` for values, ``bool`` for conditions."""
    if isinstance(node, Window):
        return WINDOW_FUNCS[node.func]
    if isinstance(node, Logic | Not):
        return "bool"
    if isinstance(node, Binary) and node.op in COMPARATORS:
        return "bool"
    return "num"


def parse(text: str, *, lookback: float = 300.0, want: str = "bool") -> Node:
    """Parse ``text``; ``want="bool"`` for rule conditions, ``"num"`` for a value."""
    if len(text) > MAX_LENGTH:
        raise ExprError(text[:40] + "...", MAX_LENGTH + 1,
                        f"expression too long ({len(text)} characters; at most {MAX_LENGTH})")
    parser = _Parser(text, lookback)
    first = parser.peek()
    node = parser.parse_or()
    tail = parser.peek()
    if tail.kind != "end":
        raise parser.fail(tail, f"unexpected {tail.text!r}")
    if kind_of(node) != want:
        need = "a condition (a comparison, absent(), and/or/not)" if want == "bool" else \
            "a number"
        raise parser.fail(first, f"the expression must be {need}")
    return node


def depth(node: Node) -> int:
    """Levels of the tree; iterative, so it is safe on any tree."""
    deepest = 0
    stack: list[tuple[Node, int]] = [(node, 1)]
    while stack:
        n, level = stack.pop()
        deepest = max(deepest, level)
        if isinstance(n, Abs | Neg | Not):
            stack.append((n.arg, level + 1))
        elif isinstance(n, Binary | Logic):
            stack.extend(((n.left, level + 1), (n.right, level + 1)))
    return deepest


def windows(node: Node) -> list[Window]:
    """Every window function in ``node``, left to right, without repeats."""
    found: list[Window] = []

    def walk(n: Node) -> None:
        if isinstance(n, Window):
            if n not in found:
                found.append(n)
        elif isinstance(n, Abs | Neg | Not):
            walk(n.arg)
        elif isinstance(n, Binary | Logic):
            walk(n.left)
            walk(n.right)

    walk(node)
    return found


def headline(node: Node) -> tuple[Node | None, str]:
    """The value an alert reports and its threshold text: the first comparison's sides."""
    if isinstance(node, Binary) and node.op in COMPARATORS:
        return node.left, f"{node.op} {render(node.right)}"
    if isinstance(node, Logic):
        return headline(node.left)
    if isinstance(node, Not):
        return headline(node.arg)
    return None, ""


def render(node: Node) -> str:
    """Canonical text of ``node`` (used in thresholds and fingerprints)."""
    if isinstance(node, Num):
        return f"{node.value:g}"
    if isinstance(node, Window):
        return node.text
    if isinstance(node, Abs):
        return f"abs({render(node.arg)})"
    if isinstance(node, Neg):
        return f"-{render(node.arg)}"
    if isinstance(node, Not):
        return f"not ({render(node.arg)})"
    return f"({render(node.left)} {node.op} {render(node.right)})"
