"""The console's limits, kept in memory by each process (with several workers, each has its own):

- `SignInLimit`: failed sign-ins per client address. After `failures` failures within `window_s` of the first,
  every sign-in from that address is refused (429 with Retry-After) until the window ends, the right key's too,
  so that a refusal says nothing about a guess. A sign-in that succeeds does not clear the count (a holder of
  one tenant's key could otherwise keep guessing the admin's). It tracks at most `addresses` addresses, the
  oldest going first, and forgets an address when its window ends.
- `InFlight`: the playground's screens in flight, so that a console key cannot flood the guard that traffic
  needs; a trial beyond the cap is refused at once, never queued.

The client address is the one uvicorn gives the request: the TCP peer, or, when the peer is one uvicorn trusts
(FORWARDED_ALLOW_IPS, by default 127.0.0.1 and ::1 only), the client its X-Forwarded-For names. Behind a load
balancer on another host, every client is the balancer's address unless the deployment trusts it that way."""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable

SIGN_IN_FAILURES = 10
SIGN_IN_WINDOW_S = 300.0
SIGN_IN_ADDRESSES = 10_000


class SignInLimit:
    """Failed sign-ins per client address, in windows of `window_s` from an address's first failure."""

    def __init__(
        self,
        failures: int = SIGN_IN_FAILURES,
        window_s: float = SIGN_IN_WINDOW_S,
        addresses: int = SIGN_IN_ADDRESSES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._failures = failures
        self._window_s = window_s
        self._addresses = addresses
        self._clock = clock
        self._windows: OrderedDict[str, tuple[float, int]] = OrderedDict()  # address: (window start, failures)

    def __len__(self) -> int:
        return len(self._windows)

    def _forget_old(self, now: float) -> None:
        """Drop the windows that have ended (the oldest come first: a window is moved to the end as it starts)."""
        while self._windows:
            start, _ = next(iter(self._windows.values()))
            if now - start < self._window_s:
                return
            self._windows.popitem(last=False)

    def retry_after(self, address: str) -> float | None:
        """Seconds until `address` may try again, or None when it may now."""
        now = self._clock()
        self._forget_old(now)
        start, failures = self._windows.get(address, (now, 0))
        return start + self._window_s - now if failures >= self._failures else None

    def failed(self, address: str) -> None:
        """Count a failed sign-in from `address`."""
        now = self._clock()
        self._forget_old(now)
        start, failures = self._windows.get(address, (now, 0))
        self._windows[address] = (start, failures + 1)
        if failures == 0:
            self._windows.move_to_end(address)
        while len(self._windows) > self._addresses:
            self._windows.popitem(last=False)


def whole_seconds(seconds: float) -> int:
    """A Retry-After value: `seconds` rounded up, at least 1."""
    return max(1, math.ceil(seconds))


class InFlight:
    """At most `most` things at once; `take` says whether one more may start now."""

    def __init__(self, most: int) -> None:
        self.most = most
        self._running = 0

    def take(self) -> bool:
        """Start one if there is room (True), else False; a True is paired with `give_back`."""
        if self._running >= self.most:
            return False
        self._running += 1
        return True

    def give_back(self) -> None:
        """One that started has ended."""
        self._running -= 1
