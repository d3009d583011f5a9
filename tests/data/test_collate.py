"""The collator: `<s> prompt </s>` sources, shifted targets, -100 where no loss, images next to text-only samples."""

from __future__ import annotations

import logging

import pytest
import torch

from scaling.data.collate import IGNORE_INDEX, Collator, Sample, format_record
from scaling.data.images import ImageTransform
from scaling.data.instruct import CandidatePools, InstructionFormatter, write_instruction_file
from scaling.data.sources import load_source
from scaling.data.synthetic import generate_synthetic
from scaling.models.biomedgpt.tokenization import train_bpe_tokenizer

IMAGE_SIZE = 32


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return generate_synthetic(tmp_path_factory.mktemp("synthetic"), n_images=20, seed=2, image_size=32)


@pytest.fixture(scope="module")
def tokenizer(synthetic):
    texts = [line for file in synthetic.root.rglob("*.json*") for line in file.read_text().splitlines()]
    return train_bpe_tokenizer(texts, vocab_size=600, num_codes=8, num_bins=8)


@pytest.fixture(scope="module")
def records(synthetic):
    vqa = load_source("slake", synthetic.sources["vqa"].path, "train").records[:6]
    nli = load_source("mednli", synthetic.sources["nli"].path, "train").records[:2]
    return vqa + nli


def tokens(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_batch_layout_without_prompt_prefix(tokenizer, records):
    batch = Collator(tokenizer, IMAGE_SIZE, max_src_len=160, max_tgt_len=16)(records)
    assert set(batch) == {"input_ids", "attention_mask", "pixel_values", "patch_masks", "decoder_input_ids",
                          "decoder_attention_mask", "labels", "ids"}
    n = len(records)
    assert batch["pixel_values"].shape == (n, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert batch["patch_masks"].tolist() == [r.image is not None for r in records]
    assert not batch["pixel_values"][~batch["patch_masks"]].any()  # text-only samples: zeros
    assert batch["ids"] == [r.id for r in records]
    for row, record in enumerate(records):
        sample = format_record(record)
        length = int(batch["attention_mask"][row].sum())
        assert batch["input_ids"][row, :length].tolist() == [0, *tokens(tokenizer, sample.prompt), 2]
        assert (batch["input_ids"][row, length:] == tokenizer.pad_token_id).all()
        answer = [*tokens(tokenizer, sample.target), 2]
        labels = batch["labels"][row]
        assert labels[:len(answer)].tolist() == answer and (labels[len(answer):] == IGNORE_INDEX).all()
        decoder = batch["decoder_input_ids"][row]
        assert decoder[:len(answer)].tolist() == [0, *answer[:-1]]  # <s> + labels shifted right
        assert int(batch["decoder_attention_mask"][row].sum()) == len(answer)


def test_prev_output_prefixes_the_decoder_with_the_prompt_and_masks_its_loss(tokenizer, records):
    batch = Collator(tokenizer, IMAGE_SIZE, max_src_len=160, max_tgt_len=16, prompt_type="prev_output")(records)
    for row, record in enumerate(records):
        sample = format_record(record)
        prompt, answer = tokens(tokenizer, sample.prompt), tokens(tokenizer, sample.target)
        decoder = batch["decoder_input_ids"][row]
        assert decoder[:1 + len(prompt) + len(answer)].tolist() == [0, *prompt, *answer]
        labels = batch["labels"][row]
        assert (labels[:len(prompt)] == IGNORE_INDEX).all()
        assert labels[len(prompt):len(prompt) + len(answer) + 1].tolist() == [*answer, 2]
        assert (labels[len(prompt) + len(answer) + 1:] == IGNORE_INDEX).all()


def test_long_prompts_and_targets_are_truncated_and_counted(tokenizer, caplog):
    collator = Collator(tokenizer, IMAGE_SIZE, max_src_len=8, max_tgt_len=3)
    long = Sample("long", "summarize", " what is the summary of" + " the liver is normal in size." * 5,
                  " there are two small lesions in the left lung.")
    short = Sample("short", "nli", " yes?", " yes")
    with caplog.at_level(logging.WARNING):
        batch = collator([long, short])
    assert batch["input_ids"].shape[1] == 8 and batch["input_ids"][0, -1].item() == 2
    assert batch["labels"][0].tolist()[-1] == 2 and batch["labels"].shape[1] == 3
    assert collator.truncated == {"prompt": 1, "target": 1}
    assert "longer than 8 tokens" in caplog.text


def test_instruction_samples_with_transformed_images_collate_and_are_redrawn_per_epoch(tokenizer, records):
    instruction = InstructionFormatter(CandidatePools.from_records(records), seed=0)
    samples, transform = [format_record(r, instruction) for r in records], ImageTransform(IMAGE_SIZE)
    for sample in samples:  # the training batches transform images before they collate
        if sample.image is not None:
            sample.image = transform(sample.image)
    assert isinstance(samples[0].image, torch.Tensor) and samples[0].prompt.startswith(" ")
    batch = Collator(tokenizer, IMAGE_SIZE, max_src_len=200, max_tgt_len=16)(samples)
    for row, record in enumerate(records):
        expected = instruction(record)
        length = int(batch["attention_mask"][row].sum())
        assert tokenizer.decode(batch["input_ids"][row, 1:length - 1]) == expected.prompt
        answer = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX].tolist()
        assert tokenizer.decode(answer[:-1]) == expected.target
    assert [format_record(r, instruction, epoch=1).prompt for r in records] != [instruction(r).prompt for r in records]


def test_instruction_files_are_read_back_as_prompts_as_written(tokenizer, records, tmp_path):
    instruction = InstructionFormatter(CandidatePools.from_records(records), seed=0)
    with_images = [r for r in records if r.image is not None]
    options = write_instruction_file(with_images, instruction, tmp_path / "train.json")
    reread = load_source("llava_med", tmp_path / "train.json", "train", **options).records
    for original, record in zip(with_images, reread, strict=True):
        sample, expected = format_record(record, instruction), instruction(original)
        assert (sample.prompt, sample.target) == (expected.prompt, expected.target)  # not wrapped a second time


def test_image_tensor_of_the_wrong_size_is_a_clear_error(tokenizer):
    sample = Sample("x", "vqa", " is there a lesion?", " yes", torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match="same image_size"):
        Collator(tokenizer, IMAGE_SIZE, max_src_len=16, max_tgt_len=4)([sample])
