"""The projections' processes collect cyclic garbage less often, and still collect it."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from audit.runtime import YOUNGEST_GENERATION_THRESHOLD, collect_garbage_less_often


@pytest.fixture
def thresholds() -> Iterator[None]:
    saved = gc.get_threshold()
    try:
        yield
    finally:
        gc.set_threshold(*saved)


class Node:
    partner: Node


def test_only_the_youngest_generation_waits_longer(thresholds: None) -> None:
    gc.set_threshold(700, 11, 12)
    collect_garbage_less_often()
    assert gc.get_threshold() == (YOUNGEST_GENERATION_THRESHOLD, 11, 12)


def test_cycles_are_still_collected_without_being_asked(thresholds: None) -> None:
    collect_garbage_less_often()
    gc.collect()
    cycles = 5 * YOUNGEST_GENERATION_THRESHOLD
    alive = []
    for _ in range(cycles):
        first, second = Node(), Node()
        first.partner, second.partner = second, first
        alive.append(weakref.ref(first))
    # Each cycle is garbage once the loop moves on; only the collector can free it.
    assert sum(ref() is not None for ref in alive) <= 2 * YOUNGEST_GENERATION_THRESHOLD
