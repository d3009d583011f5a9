"""Multi-task mixture: a seeded, resumable stream of samples drawn from several datasets.

Dataset i is drawn with probability p_i ∝ (w_i · n_i)^(1/T): T = 1 samples in proportion to weighted size, a large
T flattens towards uniform (T5/mT5 temperature sampling). Within a dataset, samples come in a fresh permutation per
pass, so nothing repeats before the whole dataset has been seen.

The stream is a pure function of (seed, global position): position g of epoch e picks its dataset from a draw
seeded by (seed, e), and the k-th draw of dataset i is element k mod n_i of permutation ⌊k / n_i⌋ seeded by
(seed, i, ⌊k / n_i⌋). Rank r of W takes global positions r, r + W, r + 2W, ..., so ranks never overlap, and the
state is just the global position — the same on every rank — which makes a resumed run see exactly the samples an
uninterrupted one would have seen:

    mixture = Mixture({"vqa": vqa, "caption": captions}, weights=[2.0, 1.0], temperature=2.0, seed=0,
                      rank=rank, world_size=world_size, batch_size=16)
    loader = DataLoader(mixture, batch_size=16, collate_fn=collator)
    ...
    sample = mixture.next()                 # or draw directly, without a DataLoader
    state = mixture.state_dict()            # with num_workers=0 or next(): what this process consumed
    state = mixture.state_dict(consumed=n)  # with worker processes: n = samples this rank consumed since start

With DataLoader workers, worker w takes every num_workers-th block of `batch_size` samples, so batches arrive in the
same order as without workers. The stream is endless (an "epoch" is `samples_per_epoch` draws, then fresh draws):
train for a number of steps.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from functools import lru_cache

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

_CHOICE, _PERMUTATION = 0, 1  # stream tags in the seed tuples, so the two kinds of draw never share a stream


def mixture_probabilities(sizes: Sequence[int], weights: Sequence[float] | None = None,
                          temperature: float = 1.0) -> np.ndarray:
    """p_i ∝ (w_i n_i)^(1/T)."""
    weights = np.ones(len(sizes)) if weights is None else np.asarray(weights, dtype=np.float64)
    scores = (weights * np.asarray(sizes, dtype=np.float64)) ** (1.0 / temperature)
    return scores / scores.sum()


class Mixture(IterableDataset):
    """An endless, rank-sharded, resumable stream over several datasets (any objects with len() and [])."""

    def __init__(self, datasets: Mapping[str, Sequence] | Sequence[Sequence], weights: Sequence[float] | None = None,
                 temperature: float = 1.0, seed: int = 0, rank: int = 0, world_size: int = 1,
                 samples_per_epoch: int | None = None, batch_size: int = 1):
        named = datasets if isinstance(datasets, Mapping) else {str(i): d for i, d in enumerate(datasets)}
        self.names, self.datasets = list(named), list(named.values())
        self.sizes = [len(d) for d in self.datasets]
        self._check(weights, temperature, rank, world_size, batch_size)
        self.probabilities = mixture_probabilities(self.sizes, weights, temperature)
        self.seed, self.rank, self.world_size, self.batch_size = seed, rank, world_size, batch_size
        per_epoch = samples_per_epoch if samples_per_epoch is not None else sum(self.sizes)
        self.epoch_length = per_epoch // world_size * world_size  # equal shares: ranks stay in lock-step
        if self.epoch_length < world_size:
            raise ValueError(f"samples_per_epoch={per_epoch} gives no sample to some of the {world_size} ranks")
        self.start = 0
        """Global position the stream (re)starts from; a multiple of world_size."""
        self.consumed = 0
        """Samples this rank has handed out in this process since `start`."""
        self._counts_before = [np.zeros(len(self.sizes), dtype=np.int64)]  # draws per dataset before epoch e

    def _check(self, weights, temperature, rank, world_size, batch_size) -> None:
        problems = [f"dataset {n!r} is empty" for n, size in zip(self.names, self.sizes, strict=True) if size == 0]
        if not self.datasets:
            problems.append("no datasets given")
        if weights is not None and (len(weights) != len(self.datasets) or min(weights) <= 0):
            problems.append(f"need one positive weight per dataset ({len(self.datasets)}), got {list(weights)}")
        if temperature <= 0:
            problems.append(f"temperature must be > 0, got {temperature}")
        if not 0 <= rank < world_size:
            problems.append(f"rank must be in [0, {world_size}), got {rank}")
        if batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {batch_size}")
        if problems:
            raise ValueError("Mixture: " + "; ".join(problems))

    # -- the stream ---------------------------------------------------------------------------------------------

    def locate(self, position: int) -> tuple[int, int]:
        """(dataset index, sample index) at a global stream position."""
        epoch, offset = divmod(position, self.epoch_length)
        which, index = self._epoch_plan(epoch)
        return int(which[offset]), int(index[offset])

    def _choices(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, _CHOICE, epoch])
        return rng.choice(len(self.sizes), size=self.epoch_length, p=self.probabilities)

    def _counts_before_epoch(self, epoch: int) -> np.ndarray:
        while len(self._counts_before) <= epoch:
            done = len(self._counts_before) - 1
            counts = np.bincount(self._choices(done), minlength=len(self.sizes))
            self._counts_before.append(self._counts_before[-1] + counts)
        return self._counts_before[epoch]

    @lru_cache(maxsize=2)  # noqa: B019 - one mixture per run; the cache lives as long as the stream does
    def _epoch_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """For every position of the epoch: which dataset, and which of its samples."""
        which = self._choices(epoch)
        index = np.empty_like(which)
        for i, (size, before) in enumerate(zip(self.sizes, self._counts_before_epoch(epoch), strict=True)):
            slots = np.flatnonzero(which == i)
            draws = before + np.arange(len(slots))  # k-th draw of dataset i overall
            for cycle in np.unique(draws // size):
                in_cycle = draws // size == cycle
                permutation = np.random.default_rng([self.seed, _PERMUTATION, i, int(cycle)]).permutation(size)
                index[slots[in_cycle]] = permutation[draws[in_cycle] % size]
        return which, index

    def next(self):
        """The next sample of this rank's stream, for loops that draw samples without a DataLoader."""
        which, index = self.locate(self.start + self.consumed * self.world_size + self.rank)
        self.consumed += 1
        return self.datasets[which][index]

    def __iter__(self) -> Iterator:
        worker = get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker is not None else (1, 0)
        ordinal = self.consumed  # this rank's samples already handed out
        while True:
            block = ordinal // self.batch_size
            if block % workers == worker_id:
                which, index = self.locate(self.start + ordinal * self.world_size + self.rank)
                if worker is None:
                    self.consumed = ordinal + 1
                yield self.datasets[which][index]
                ordinal += 1
            else:  # another worker's block: skip it whole
                ordinal = (block + 1) * self.batch_size

    # -- resuming -----------------------------------------------------------------------------------------------

    def state_dict(self, consumed: int | None = None) -> dict:
        """Where the stream stands after this rank consumed `consumed` samples since start (default: the count
        this process handed out, exact when the DataLoader has no worker processes)."""
        position = self.start + (self.consumed if consumed is None else consumed) * self.world_size
        epoch, offset = divmod(position, self.epoch_length)
        return {"epoch": epoch, "position": offset, "seed": self.seed, "names": self.names, "sizes": self.sizes,
                "probabilities": self.probabilities.tolist(), "epoch_length": self.epoch_length,
                "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved state; the datasets, seed, probabilities and world size must be the same."""
        mine = self.state_dict(consumed=0)
        changed = [key for key in ("seed", "names", "sizes", "epoch_length", "world_size") if state[key] != mine[key]]
        if not np.allclose(state["probabilities"], mine["probabilities"]):
            changed.append("probabilities")
        if changed:
            raise ValueError(f"cannot resume the data mixture: {', '.join(changed)} changed since the checkpoint "
                             f"(saved {[state[k] for k in changed]}, now {[mine[k] for k in changed]}). Fix: resume "
                             "with the same data, weights, temperature, seed and number of processes")
        self.start = state["epoch"] * self.epoch_length + state["position"]
        self.consumed = 0
