"""The batch stream and undecodable training images: the sample is dropped and counted, the same way with or without
image threads and after a resume; too many stop the run with a clear error."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from scaling.config import DataArgs, SourceArgs, load_config
from scaling.data.loading import SourceSplit, load_sources
from scaling.data.records import DataError, ImageRef
from scaling.data.synthetic import generate_synthetic
from scaling.models.biomedgpt.tokenization import train_bpe_tokenizer
from scaling.training.batches import BatchStream
from scaling.training.run import tokenizer_corpus

IMAGE_SIZE = 32


@pytest.fixture(scope="module")
def vqa(tmp_path_factory) -> SourceSplit:
    data = generate_synthetic(tmp_path_factory.mktemp("synthetic"), 20, seed=0)
    source = data.sources["vqa"]
    [split] = load_sources([SourceArgs(name=source.loader, path=str(source.path), split="train",
                                       options=dict(source.options))], DataArgs())
    return dataclasses.replace(split, records=split.records[:10])


def with_broken_images(split: SourceSplit, broken: int) -> list[SourceSplit]:
    """The split with the images of its first `broken` records replaced by bytes no decoder reads."""
    records = [dataclasses.replace(r, image=ImageRef(data=b"\x89PNG not really")) if i < broken else r
               for i, r in enumerate(split.records)]
    return [dataclasses.replace(split, records=records)]


def make_stream(train: list[SourceSplit], num_workers: int) -> BatchStream:
    cfg = load_config(overrides=[f"data.num_workers={num_workers}", "train.batch_size=5", "train.seed=3"])
    tokenizer = train_bpe_tokenizer(tokenizer_corpus(train), vocab_size=400, num_codes=0, num_bins=0)
    return BatchStream(train, cfg, tokenizer, IMAGE_SIZE, rank=0, world_size=1)


def draw(stream: BatchStream, n: int) -> list[dict[str, torch.Tensor]]:
    return [stream.next_batch(torch.device("cpu")) for _ in range(n)]


def test_unreadable_images_drop_their_samples_alike_with_threads_and_after_a_resume(vqa):
    train = with_broken_images(vqa, broken=2)
    plain = make_stream(train, 0)
    batches = draw(plain, 6)  # three passes over the 10 records: each broken one drawn three times
    assert plain.images_skipped == 6 and plain.images_drawn == 30
    assert sum(len(b["input_ids"]) for b in batches) == 24
    threaded, resumed = make_stream(train, 2), make_stream(train, 2)
    for a, b in zip(draw(threaded, 3), batches[:3], strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    resumed.load_state_dict(threaded.state_dict())
    for a, b in zip(draw(resumed, 3), batches[3:], strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.images_skipped == 6


def test_too_many_unreadable_images_stop_with_a_clear_error(vqa):
    stream = make_stream(with_broken_images(vqa, broken=10), 0)
    with pytest.raises(DataError, match=r"11 of the 11 training images drawn could not be decoded.*--verify-images"):
        draw(stream, 3)
