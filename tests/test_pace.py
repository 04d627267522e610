"""The following projector's pace, on a clock the test sets: at once for a trickle, later
(but not too late) during a burst."""

from __future__ import annotations

from audit.projections.pace import FollowingPace

BUSY = FollowingPace.BUSY_EVENTS_PER_SECOND
LOOK = FollowingPace.LOOK_SECONDS
MAX_DEFER = FollowingPace.MAX_DEFER_SECONDS


def test_the_first_events_after_a_quiet_spell_are_projected_at_once() -> None:
    pace = FollowingPace()
    assert pace.wait_before_catching_up(100.0, 2) == 0.0


def test_a_trickle_is_projected_at_once() -> None:
    pace = FollowingPace()
    head = 0
    for second in range(10):
        head += 20  # ten deliveries a second: well under a burst
        assert pace.wait_before_catching_up(float(second), head) == 0.0
        pace.caught_up()


def test_a_burst_waits_until_it_pauses() -> None:
    pace = FollowingPace()
    assert pace.wait_before_catching_up(0.0, 10) == 0.0
    pace.caught_up()
    head = 10 + int(BUSY * LOOK) * 2  # twice the busy rate
    assert pace.wait_before_catching_up(LOOK, head) == LOOK
    assert pace.wait_before_catching_up(2 * LOOK, head + int(BUSY * LOOK) * 2) == LOOK
    # Nothing more arrived since the last look: the burst has paused.
    assert pace.wait_before_catching_up(3 * LOOK, head + int(BUSY * LOOK) * 2) == 0.0


def test_a_burst_that_goes_on_waits_no_longer_than_max_defer() -> None:
    pace = FollowingPace()
    now, head = 0.0, 0
    assert pace.wait_before_catching_up(now, head) == 0.0
    pace.caught_up()
    waited, pause = 0.0, LOOK
    for _ in range(100):
        now += LOOK
        head += int(BUSY * LOOK) * 4
        pause = pace.wait_before_catching_up(now, head)
        if not pause:
            break
        waited += pause
    assert pause == 0.0
    assert MAX_DEFER - LOOK <= waited <= MAX_DEFER
    # Once caught up, the next wait starts afresh.
    pace.caught_up()
    assert pace.wait_before_catching_up(now + LOOK, head + int(BUSY * LOOK) * 4) == LOOK
