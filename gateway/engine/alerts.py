"""Alert state of one rule for every device, stepped with array operations.

States: inactive -> pending (while ``for`` runs) -> firing -> inactive (resolved).
``emitted`` is what consumers were told; events are the differences between it and the
internal state, so suppressing events while flapping and reconciling afterwards is one rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

INACTIVE, PENDING, FIRING = 0, 1, 2
B = npt.NDArray[np.bool_]
F64 = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class StepResult:
    fired: B  # emit a fired event (and fire actions)
    resolved: B
    flapping: B  # entered flapping on this tick
    any: bool = True  # False: all three are empty


class AlertTable:
    """Arrays indexed by device; ``actions`` cooldown clocks are ``(n_actions, devices)``."""

    def __init__(self, *, for_: float, flap_transitions: int, flap_window: float,
                 n_actions: int, devices: int) -> None:
        self.for_ = for_
        self.flap_k = flap_transitions
        self.flap_window = flap_window
        self.warm_until = -math.inf
        self.n_actions = n_actions
        self._alloc(devices)

    def _alloc(self, devices: int) -> None:
        self.state = np.zeros(devices, dtype=np.int8)
        self.since = np.full(devices, math.nan)  # pending or firing since
        self.emitted = np.zeros(devices, dtype=bool)
        self.flapping = np.zeros(devices, dtype=bool)
        self.trans = np.full((devices, max(self.flap_k, 1)), -math.inf)
        self.trans_pos = np.zeros(devices, dtype=np.int64)
        self.sent = np.full((self.n_actions, devices), -math.inf)

    def grow(self, devices: int) -> None:
        old = (self.state, self.since, self.emitted, self.flapping, self.trans,
               self.trans_pos, self.sent)
        n = old[0].size
        self._alloc(devices)
        self.state[:n], self.since[:n], self.emitted[:n] = old[0], old[1], old[2]
        self.flapping[:n], self.trans[:n], self.trans_pos[:n] = old[3], old[4], old[5]
        self.sent[:, :n] = old[6]

    def step(self, cond: B, clear: B | None, now: float) -> StepResult:
        """Advance every device by one tick; ``cond`` is already masked to matching devices."""
        n = cond.size
        state, since = self.state[:n], self.since[:n]
        # count_nonzero: what ``any()`` says, without the reduction's set-up per call.
        if now < self.warm_until or not (
                np.count_nonzero(cond) or np.count_nonzero(state) or
                np.count_nonzero(self.emitted[:n]) or
                (self.flap_k > 0 and np.count_nonzero(self.flapping[:n]))):
            # Windows are refilling after a restart: hold every state as it was. Or all
            # inactive, told so, not flapping and no condition true: nothing can change
            # (no transition, so the flapping window only empties further).
            none = np.zeros(n, dtype=bool)
            return StepResult(none, none, none, any=False)
        was = state.copy()
        start = (was == INACTIVE) & cond
        at_once = start & (self.for_ <= 0)
        waited = (was == PENDING) & cond & (now - since >= self.for_)
        dropped = (was == PENDING) & ~cond
        ends = clear if clear is not None else ~cond
        resolve = (was == FIRING) & ends
        fire = at_once | waited
        state[start & ~at_once] = PENDING
        since[start] = now
        state[fire] = FIRING
        state[dropped | resolve] = INACTIVE
        since[dropped | resolve] = math.nan
        changed = fire | resolve
        entered = np.zeros(n, dtype=bool)
        if self.flap_k > 0:
            rows = np.flatnonzero(changed)
            self.trans[rows, self.trans_pos[rows] % self.flap_k] = now
            self.trans_pos[rows] += 1
            # K changes inside the window <=> the oldest of the last K is inside it.
            oldest = self.trans[:n, 0]
            for j in range(1, self.trans.shape[1]):  # column by column: vector operations
                oldest = np.minimum(oldest, self.trans[:n, j])
            flapping = oldest >= now - self.flap_window
            entered = flapping & ~self.flapping[:n]
            self.flapping[:n] = flapping
        firing = state == FIRING
        quiet = ~self.flapping[:n]
        emitted = self.emitted[:n]
        fired = quiet & firing & ~emitted
        resolved = quiet & ~firing & emitted
        emitted[fired] = True
        emitted[resolved] = False
        return StepResult(fired, resolved, entered)

    def take_cooldown(self, action: int, rows: npt.NDArray[np.int64], now: float,
                      cooldown: float) -> npt.NDArray[np.int64]:
        """Rows whose action ``action`` may be sent now; their clocks restart."""
        ok: npt.NDArray[np.int64] = rows[now - self.sent[action, rows] >= cooldown]
        self.sent[action, ok] = now
        return ok

    def is_firing(self, n: int) -> B:
        return self.emitted[:n].copy()

    # -- persistence -------------------------------------------------------------

    def dump_row(self, i: int) -> dict[str, Any] | None:
        """JSON-able state of one device, or None when there is nothing to remember."""
        trans = [float(t) for t in self.trans[i] if math.isfinite(t)]
        sent = [None if math.isinf(s) else float(s) for s in self.sent[:, i]]
        if self.state[i] == INACTIVE and not self.emitted[i] and not trans and \
                all(s is None for s in sent):
            return None
        return {
            "state": int(self.state[i]),
            "since": None if math.isnan(self.since[i]) else float(self.since[i]),
            "emitted": bool(self.emitted[i]),
            "flapping": bool(self.flapping[i]),
            "transitions": sorted(trans),
            "sent": sent,
        }

    def load_row(self, i: int, row: dict[str, Any]) -> None:
        self.state[i] = int(row["state"])
        self.since[i] = math.nan if row["since"] is None else float(row["since"])
        self.emitted[i] = bool(row["emitted"])
        self.flapping[i] = bool(row["flapping"])
        trans = [float(t) for t in row["transitions"]][-max(self.flap_k, 1):]
        self.trans[i] = -math.inf
        for j, t in enumerate(trans):
            self.trans[i, j % self.trans.shape[1]] = t
        self.trans_pos[i] = len(trans)
        sent = list(row["sent"])[: self.n_actions]
        for a, s in enumerate(sent):
            self.sent[a, i] = -math.inf if s is None else float(s)
