"""The multi-task mixture: temperature probabilities, rank shards, and exact mid-epoch resume."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
from torch.utils.data import DataLoader

from scaling.data.mixture import Mixture, mixture_probabilities

SIZES = {"vqa": 30, "caption": 12, "nli": 6}


def datasets() -> dict[str, list[tuple[str, int]]]:
    return {name: [(name, i) for i in range(size)] for name, size in SIZES.items()}


def as_list(batch) -> list[tuple[str, int]]:
    return list(batch)


def batches(mixture: Mixture, n: int, num_workers: int = 0, batch_size: int = 4) -> list[list]:
    loader = DataLoader(mixture, batch_size=batch_size, collate_fn=as_list, num_workers=num_workers)
    return list(itertools.islice(loader, n))


def test_probabilities_follow_weighted_size_to_the_power_one_over_temperature():
    np.testing.assert_allclose(mixture_probabilities([90, 10]), [0.9, 0.1])
    np.testing.assert_allclose(mixture_probabilities([90, 10], temperature=2.0), [0.75, 0.25])
    np.testing.assert_allclose(mixture_probabilities([90, 10], weights=[1.0, 9.0]), [0.5, 0.5])
    assert np.ptp(mixture_probabilities([1000, 10, 1], temperature=1e6)) < 1e-4


def test_realised_mixture_matches_the_probabilities_and_passes_never_repeat():
    mixture = Mixture(datasets(), temperature=2.0, seed=0)
    stream = list(itertools.islice(iter(mixture), 4800))
    counts = Counter(name for name, _ in stream)
    for name, p in zip(mixture.names, mixture.probabilities, strict=True):
        assert abs(counts[name] / len(stream) - p) < 0.03
    nli = [i for name, i in stream if name == "nli"]
    for start in range(0, len(nli) - 6, 6):  # each pass over a dataset is a permutation
        assert sorted(nli[start:start + 6]) == list(range(6))


def test_ranks_take_disjoint_interleaved_shares_of_one_stream():
    single = list(itertools.islice(iter(Mixture(datasets(), seed=3)), 96))
    ranks = [list(itertools.islice(iter(Mixture(datasets(), seed=3, rank=r, world_size=2)), 48)) for r in (0, 1)]
    assert [x for pair in zip(*ranks, strict=True) for x in pair] == single


def test_same_seed_same_stream_other_seed_other_stream():
    first = list(itertools.islice(iter(Mixture(datasets(), seed=1)), 100))
    assert first == list(itertools.islice(iter(Mixture(datasets(), seed=1)), 100))
    assert first != list(itertools.islice(iter(Mixture(datasets(), seed=2)), 100))


@pytest.mark.parametrize("world_size", [1, 2])
def test_resumed_run_sees_exactly_what_an_uninterrupted_run_sees(world_size):
    # 48 samples per epoch: 25 batches of 4 cross several epoch boundaries, the interruption falls mid-epoch
    for rank in range(world_size):
        def build(rank=rank):
            return Mixture(datasets(), weights=[1.0, 2.0, 3.0], temperature=1.5, seed=7, rank=rank,
                           world_size=world_size)

        uninterrupted = batches(build(), 25)
        first = build()
        before = batches(first, 11)
        state = first.state_dict()
        assert state["epoch"] * first.epoch_length + state["position"] == 11 * 4 * world_size
        resumed = build()
        resumed.load_state_dict(state)
        after = batches(resumed, 14)
        assert before + after == uninterrupted
        second_state = resumed.state_dict()  # resuming twice keeps counting from the loaded position
        assert second_state["epoch"] * first.epoch_length + second_state["position"] == 25 * 4 * world_size


def test_drawing_with_next_follows_the_same_stream_and_resumes():
    stream = list(itertools.islice(iter(Mixture(datasets(), seed=4)), 70))
    first = Mixture(datasets(), seed=4)
    drawn = [first.next() for _ in range(30)]
    resumed = Mixture(datasets(), seed=4)
    resumed.load_state_dict(first.state_dict())
    assert drawn + [resumed.next() for _ in range(40)] == stream


def test_worker_processes_give_the_same_batches_and_resume_from_a_consumed_count():
    def build():
        return Mixture(datasets(), seed=11, batch_size=4)

    plain = batches(build(), 12)
    assert batches(build(), 12, num_workers=2) == plain
    first = build()
    batches(first, 5, num_workers=2)  # workers iterate their own copies; the trainer counts what it consumed
    resumed = build()
    resumed.load_state_dict(first.state_dict(consumed=5 * 4))
    assert batches(resumed, 7, num_workers=2) == plain[5:]


def test_resuming_with_other_data_or_seed_is_refused():
    state = Mixture(datasets(), seed=0).state_dict()
    with pytest.raises(ValueError, match="seed changed"):
        Mixture(datasets(), seed=1).load_state_dict(state)
    smaller = datasets()
    smaller["nli"] = smaller["nli"][:5]
    with pytest.raises(ValueError, match="sizes"):
        Mixture(smaller, seed=0).load_state_dict(state)


def test_bad_arguments_are_reported_together():
    with pytest.raises(ValueError, match=r"dataset 'nli' is empty.*temperature must be > 0"):
        Mixture({"vqa": [1, 2], "nli": []}, temperature=0.0)
