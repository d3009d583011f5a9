"""The recipes' BatchStream: image worker threads change nothing in the batches, and a stream restored from the
state of the last batch handed out continues exactly, although later batches were already being prepared."""

from __future__ import annotations

import pytest
import torch

from scaling.config import DataArgs, SourceArgs, load_config
from scaling.data.instruct import CandidatePools, InstructionFormatter
from scaling.data.loading import SourceSplit, all_records, load_sources
from scaling.data.synthetic import generate_synthetic
from scaling.models.biomedgpt.tokenization import train_bpe_tokenizer
from scaling.training.batches import BatchStream
from scaling.training.run import tokenizer_corpus

IMAGE_SIZE = 32


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list[SourceSplit]:
    data = generate_synthetic(tmp_path_factory.mktemp("synthetic"), 20, seed=0)
    sources = [SourceArgs(name=s.loader, path=str(s.path), split="train", options=dict(s.options))
               for task, s in data.sources.items() if task in ("vqa", "caption")]
    return load_sources(sources, DataArgs())


def make_stream(train: list[SourceSplit], num_workers: int) -> BatchStream:
    cfg = load_config(overrides=[f"data.num_workers={num_workers}", "train.batch_size=5", "train.seed=3"])
    tokenizer = train_bpe_tokenizer(tokenizer_corpus(train), vocab_size=400, num_codes=0, num_bins=0)
    formatter = InstructionFormatter(CandidatePools.from_records(all_records(train)))
    return BatchStream(train, cfg, tokenizer, IMAGE_SIZE, rank=0, world_size=1, instruction=formatter)


def draw(stream: BatchStream, n: int) -> list[dict[str, torch.Tensor]]:
    return [stream.next_batch(torch.device("cpu")) for _ in range(n)]


def assert_same(first: list[dict], second: list[dict]) -> None:
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_worker_threads_give_the_same_augmented_batches_as_the_training_loop(records):
    plain = draw(make_stream(records, 0), 6)
    assert_same(draw(make_stream(records, 2), 6), plain)
    pixels = torch.stack([b["pixel_values"] for b in plain])
    assert pixels.flatten(2).std(-1).min() > 0  # real, augmented images reached the batches


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_stream_restored_from_the_consumed_position_continues_exactly(records, num_workers: int):
    reference = draw(make_stream(records, num_workers), 7)
    first = make_stream(records, num_workers)
    draw(first, 3)  # with workers, batches 4.. are already planned and being transformed
    resumed = make_stream(records, num_workers)
    resumed.load_state_dict(first.state_dict())
    assert_same(draw(resumed, 4), reference[3:])
    first.load_state_dict(first.state_dict())  # dropping the planned batches of a running stream also works
    assert_same(draw(first, 4), reference[3:])



def test_closing_a_stream_stops_its_threads_and_keeps_the_consumed_position(records):
    stream = make_stream(records, 2)
    draw(stream, 2)
    position = stream.state_dict()
    stream.close()
    assert not stream.pending and stream.state_dict() == position
    with pytest.raises(RuntimeError):  # the executor is shut down
        stream.workers.submit(int)
