"""An adaptive concurrency limit for calls to a stage that is only an optimisation.

The semantic tier shares a small machine with everything else: when it falls
behind, every request that waits for it waits in vain, and each such wait still
costs the tier an embedding. So each ingress replica lets at most ``limit``
lookups be in flight and takes the rest as misses at once. The limit moves by
AIMD, as TCP's congestion window and Netflix's concurrency-limits ``AIMDLimit``
do: a call answered within ``target_s`` adds ``1 / limit`` (about one per
limit's worth of calls), a slower or failed one halves it, at most once per
``target_s`` so that one burst of slow answers counts as one signal.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class AdaptiveLimit:
    def __init__(
        self,
        maximum: int,
        target_s: float,
        *,
        minimum: int = 1,
        backoff: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 1 <= minimum <= maximum:
            raise ValueError("need 1 <= minimum <= maximum")
        self.maximum = maximum
        self.minimum = minimum
        self.target_s = target_s
        self._backoff = backoff
        self._clock = clock
        self.limit = float(maximum)  # a healthy stage is never held back
        self.in_flight = 0
        self._decreased_at = -float("inf")

    def try_acquire(self) -> bool:
        """Whether a call may start now; a True must be followed by ``release``."""
        if self.in_flight >= int(self.limit):
            return False
        self.in_flight += 1
        return True

    def release(self, latency_s: float, ok: bool | None) -> None:
        """``ok`` None: the call was abandoned by its caller (no signal either way)."""
        busy = self.in_flight >= self.limit / 2  # growth only while the limit is in use
        self.in_flight -= 1
        if ok is None:
            return
        if ok and latency_s <= self.target_s:
            if busy:
                self.limit = min(self.maximum, self.limit + 1.0 / self.limit)
            return
        now = self._clock()
        if now - self._decreased_at >= self.target_s:
            self._decreased_at = now
            self.limit = max(self.minimum, self.limit * self._backoff)
