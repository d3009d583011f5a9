"""Long-lived objects leave the cycle collector's reach, and reference counting still frees them."""

import gc
import weakref

from scaling.training.run import exempt_from_cycle_collection


class Record:
    def __init__(self, i: int):
        self.fields = {"id": [i]}  # a dict of atoms would not be tracked at all


def test_objects_alive_at_the_call_are_skipped_by_collections_and_still_freed():
    records = [Record(i) for i in range(20_000)]
    tracked = {id(o) for o in gc.get_objects()}
    assert gc.is_tracked(records[0].fields) and id(records[0].fields) in tracked  # the control: the collector sees it
    try:
        exempt_from_cycle_collection()
        assert gc.get_freeze_count() >= 40_000
        tracked = {id(o) for o in gc.get_objects()}
        assert id(records[0].fields) not in tracked and id(records[-1].fields) not in tracked
        later = Record(-1)
        assert id(later.fields) in {id(o) for o in gc.get_objects()}  # objects made afterwards are collected as usual
        gone = weakref.ref(records[0])
        records.clear()
        assert gone() is None  # frozen, yet freed by reference counting
    finally:
        gc.unfreeze()
