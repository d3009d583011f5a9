"""Each rank's stream of training micro-batches.

    train_data = load_sources(training_sources(cfg, accelerator), cfg.data)    # scaling.data.loading
    stream = BatchStream(train_data, cfg, tokenizer, image_size, rank, world_size)
    batch = stream.next_batch(device)                                          # the model's forward kwargs

The stream's whole position is the mixture's state, the augmentation seed stream and the count of unreadable images,
as of the last batch handed out: `state_dict()` goes into every checkpoint, so a resumed run draws exactly the
batches the uninterrupted run would have drawn.

An image that cannot be decoded (corrupt, truncated, over max_pixels) drops its sample from the batch, with a warning
naming the record and the file, and is counted (`images_skipped` in the step log). Whether an image decodes does not
depend on timing, so a resumed run drops the same samples. When more than UNREADABLE_FRACTION of the images drawn
are unreadable (past the first UNREADABLE_GRACE), the run stops with a DataError.
"""

from __future__ import annotations

import random
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from scaling.config import Config
from scaling.data.images import ImageError
from scaling.data.loading import SourceSplit, records_by_label
from scaling.data.records import DataError
from scaling.logging import get_logger

log = get_logger(__name__)

MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "patch_masks", "decoder_input_ids",
                "decoder_attention_mask", "labels")
UNREADABLE_FRACTION = 0.01
UNREADABLE_GRACE = 10


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
        self.images_drawn = self.images_skipped = 0
        self.consumed_state = self._position()

    def next_batch(self, device: torch.device) -> dict[str, torch.Tensor]:
        samples = []
        while not samples:  # a batch whose every image is unreadable gives way to the next one
            while len(self.pending) <= self.lookahead:
                self.pending.append(self._plan())
            planned = self.pending.popleft()
            samples = [s for s, r, i in zip(planned.samples, planned.records, planned.images, strict=True)
                       if self._with_image(s, r, i)]
            self.consumed_state = planned.state_after
        batch = self.collator(samples)
        return {k: v.to(device) for k, v in batch.items() if k in MODEL_INPUTS}

    def _with_image(self, sample, record, image: Future | None) -> bool:
        """Put the transformed image into the sample; False (counted, logged) when it cannot be decoded."""
        if image is None:
            return True
        self.images_drawn += 1
        try:
            sample.image = image.result()
            return True
        except ImageError as error:
            self.images_skipped += 1
            log.warning("skipped sample %s of %s (record %d): %s", record.id, record.source, record.index, error)
        if self.images_skipped > max(UNREADABLE_GRACE, UNREADABLE_FRACTION * self.images_drawn):
            raise DataError(
                f"{self.images_skipped} of the {self.images_drawn} training images drawn could not be decoded (more "
                f"than {UNREADABLE_FRACTION:.0%}); the log names each one. Fix: repair or remove them, or find them "
                "all first with `scaling data inspect <source> --path <dataset> --verify-images` (verify_images: true "
                "in a source's options skips them when the data is loaded)")
        return False

    def _plan(self) -> PlannedBatch:
        """The next batch's samples, and its images being transformed (by a worker thread, or here)."""
        from scaling.data.collate import format_record

        epoch = self.mixture.state_dict()["epoch"]  # instruction templates and options are re-drawn every epoch
        records = [self.mixture.next() for _ in range(self.batch_size)]
        samples = [format_record(record, self.instruction, epoch) for record in records]
        images = [self._transform(s.image, self.seeds.getrandbits(64)) if s.image is not None else None
                  for s in samples]
        return PlannedBatch(samples, records, images, self._position())

    def _transform(self, image, seed: int) -> Future:
        if self.workers is not None:
            return self.workers.submit(self.transform, image, random.Random(seed))
        done: Future = Future()
        try:
            done.set_result(self.transform(image, random.Random(seed)))
        except ImageError as error:  # raised where the result is read, as from a worker thread
            done.set_exception(error)
        return done

    def _position(self) -> dict:
        version, internal, gauss = self.seeds.getstate()
        return {"mixture": self.mixture.state_dict(), "augment_rng": [version, list(internal), gauss]}

    def state_dict(self) -> dict:
        """The position after the last batch handed out (planned-ahead batches are drawn again on resume)."""
        return {**self.consumed_state, "images": {"drawn": self.images_drawn, "skipped": self.images_skipped}}

    def load_state_dict(self, state: dict) -> None:
        self._drop_pending()
        self.mixture.load_state_dict(state["mixture"])
        version, internal, gauss = state["augment_rng"]
        self.seeds.setstate((version, tuple(internal), gauss))
        counts = state.get("images", {})  # checkpoints from before unreadable images were counted have none
        self.images_drawn, self.images_skipped = counts.get("drawn", 0), counts.get("skipped", 0)
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
    records: list
    images: list  # per sample: a Future of the transformed tensor, or None
    state_after: dict
