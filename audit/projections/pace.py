"""When a projector that follows the store should catch up: the webhooks come first."""

from __future__ import annotations


class FollowingPace:
    """When a projector that follows the store should catch up with it.

    At once while deliveries trickle in. During a burst (BUSY_EVENTS_PER_SECOND or more since
    the last look) it waits, looking again every LOOK_SECONDS, until the burst pauses or it has
    left events waiting for MAX_DEFER_SECONDS; then it catches up in large batches.

    Why: the webhooks then have the machine. The projections' child is niced, but its
    statements run in PostgreSQL at full priority; following a 32-client burst they took about
    a third of the CPU (bench/ingest.py, 3,000 deliveries: ours/baseline 0.72 following at once,
    0.95 with this pace). The work is moved, not saved: under sustained load the projections
    still take their share, and their lag stays within about MAX_DEFER_SECONDS plus a catch-up.
    """

    BUSY_EVENTS_PER_SECOND = 200.0  # two events per delivery: its own and its marker
    LOOK_SECONDS = 0.25
    MAX_DEFER_SECONDS = 2.0

    def __init__(self) -> None:
        self._last_look: tuple[float, int] | None = None
        self._waiting_since: float | None = None

    def wait_before_catching_up(self, now: float, head: int) -> float:
        """Seconds to wait before looking again, or 0 to catch up now (`head`: the store's)."""
        last, self._last_look = self._last_look, (now, head)
        if self._waiting_since is None:
            self._waiting_since = now
        if last is None or now <= last[0] or now - self._waiting_since >= self.MAX_DEFER_SECONDS:
            return 0.0
        busy = (head - last[1]) / (now - last[0]) >= self.BUSY_EVENTS_PER_SECOND
        return self.LOOK_SECONDS if busy else 0.0

    def caught_up(self) -> None:
        self._waiting_since = None
