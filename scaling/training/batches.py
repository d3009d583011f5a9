"""Each rank's stream of training micro-batches.

    train_data = load_sources(training_sources(cfg, accelerator), cfg.data)    # scaling.data.loading
    stream = BatchStream(train_data, cfg, tokenizer, image_size, rank, world_size)
    batch = stream.next_batch(device)                                          # the model's forward kwargs

The stream's whole position is the mixture's state and the augmentation seed stream, as of the last batch handed
out: `state_dict()` goes into every checkpoint, so a resumed run draws exactly the batches the uninterrupted run would
have drawn.
"""

from __future__ import annotations

import random
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from scaling.config import Config
from scaling.data.loading import SourceSplit, records_by_label

MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "patch_masks", "decoder_input_ids",
                "decoder_attention_mask", "labels")


class BatchStream:
    """This rank's endless stream of micro-batches: a seeded mixture of the sources, augmented images, optional
    instruction formatting. Its state (mixture position, augmentation seeds) is all a resumed run needs.

    Batches are planned in order in the training process (records, prompts, one augmentation seed per image), so
    the stream is the same for any `data.num_workers`; with workers, threads decode and augment the images of the
    next batches while the model trains on the current one (PIL releases the GIL while it works).
    """

    def __init__(self, train_data: list[SourceSplit], cfg: Config, tokenizer, image_size: int, rank: int,
                 world_size: int, instruction=None):
        from scaling.data.collate import Collator
        from scaling.data.images import ImageTransform
        from scaling.data.mixture import Mixture

        self.mixture = Mixture(records_by_label(train_data), [s.source.weight for s in train_data],
                               cfg.data.temperature, cfg.train.seed, rank=rank, world_size=world_size,
                               batch_size=cfg.train.batch_size)
        self.transform = ImageTransform(image_size, train=True)
        self.seeds = random.Random(cfg.train.seed * 1000 + rank)  # one augmentation seed per image, in order
        self.collator = Collator(tokenizer, image_size, cfg.data.max_src_len, cfg.data.max_tgt_len,
                                 cfg.data.prompt_type, transform=self.transform)
        self.instruction = instruction
        self.batch_size = cfg.train.batch_size
        self.workers = ThreadPoolExecutor(cfg.data.num_workers) if cfg.data.num_workers else None
        self.lookahead = 2 * cfg.data.num_workers  # batches in flight
        self.pending: deque[PlannedBatch] = deque()
        self.consumed_state = self._position()

    def next_batch(self, device: torch.device) -> dict[str, torch.Tensor]:
        while len(self.pending) <= self.lookahead:
            self.pending.append(self._plan())
        planned = self.pending.popleft()
        for sample, image in zip(planned.samples, planned.images, strict=True):
            sample.image = image.result() if isinstance(image, Future) else image
        self.consumed_state = planned.state_after
        batch = self.collator(planned.samples)
        return {k: v.to(device) for k, v in batch.items() if k in MODEL_INPUTS}

    def _plan(self) -> PlannedBatch:
        """The next batch's samples, and its images being transformed (by a worker thread, or here)."""
        from scaling.data.collate import format_record

        epoch = self.mixture.state_dict()["epoch"]  # instruction templates and options are re-drawn every epoch
        samples = [format_record(self.mixture.next(), self.instruction, epoch) for _ in range(self.batch_size)]
        images = [self._transform(s.image, self.seeds.getrandbits(64)) if s.image is not None else None
                  for s in samples]
        return PlannedBatch(samples, images, self._position())

    def _transform(self, image, seed: int):
        if self.workers is None:
            return self.transform(image, random.Random(seed))
        return self.workers.submit(self.transform, image, random.Random(seed))

    def _position(self) -> dict:
        version, internal, gauss = self.seeds.getstate()
        return {"mixture": self.mixture.state_dict(), "augment_rng": [version, list(internal), gauss]}

    def state_dict(self) -> dict:
        """The position after the last batch handed out (planned-ahead batches are drawn again on resume)."""
        return self.consumed_state

    def load_state_dict(self, state: dict) -> None:
        self._drop_pending()
        self.mixture.load_state_dict(state["mixture"])
        version, internal, gauss = state["augment_rng"]
        self.seeds.setstate((version, tuple(internal), gauss))
        self.consumed_state = self._position()

    def close(self) -> None:
        """Drop the planned-ahead batches and stop the image threads (the stream is done)."""
        self._drop_pending()
        if self.workers is not None:
            self.workers.shutdown(wait=True)

    def _drop_pending(self) -> None:
        for planned in self.pending:
            for image in planned.images:
                if isinstance(image, Future):
                    image.cancel()
        self.pending.clear()


@dataclass
class PlannedBatch:
    samples: list
    images: list  # per sample: a transformed tensor, a Future of one, or None
    state_after: dict
