"""Records → (prompt, target, image) samples → padded model batches.

The batch holds exactly the model's forward inputs plus the sample ids:

    input_ids, attention_mask              (B, S)   `<s> prompt </s>`, right-padded with <pad>
    decoder_input_ids, decoder_attention_mask, labels
                                           (B, T)   labels = ` answer</s>`, -100 on padding;
                                                    decoder_input_ids = `<s>` + labels shifted right
    pixel_values                           (B, 3, H, W) zeros for text-only samples
    patch_masks                            (B,)     True where the sample has an image
    ids                                    list[str]

With prompt_type="prev_output" (BiomedGPT's VQA setting) the decoder is prefixed with the source tokens without
</s>: decoder_input_ids = `<s> prompt answer`, labels = `-100 … -100 answer </s>`, so the loss covers only the
answer while the decoder still reads the question.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from scaling.data.images import ImageTransform
from scaling.data.instruct import InstructionFormatter
from scaling.data.records import ImageRef, Record
from scaling.data.tasks import get_task, normalize_whitespace
from scaling.logging import get_logger

log = get_logger(__name__)
IGNORE_INDEX = -100
PromptType = Literal["none", "prev_output"]


@dataclass
class Sample:
    """One training example after task (and instruction) formatting, before tokenization."""

    id: str
    task: str
    prompt: str
    target: str
    image: ImageRef | Image.Image | torch.Tensor | None = None
    """An undecoded reference, a decoded image, or an already transformed (3, H, W) tensor."""


def format_record(record: Record, instruction: InstructionFormatter | None = None, epoch: int = 0) -> Sample:
    """The record's prompt and target: the task's BiomedGPT prompt, an instruction, or, for records read back from
    an instruction file (instructions already), the question as written."""
    task = get_task(record.task)
    if is_instruction(record):
        prompt, target = " " + normalize_whitespace(record.text["question"]), task.target(record)
    elif instruction is not None:
        formatted = instruction(record, epoch)
        prompt, target = formatted.prompt, formatted.target
    else:
        prompt, target = task.prompt(record), task.target(record)
    return Sample(record.id, record.task, prompt, target, record.image)


def is_instruction(record: Record) -> bool:
    """Records of an instruction file written by `write_instruction_file` (the llava_med source keeps its
    `task` field as the `source_task` attribute)."""
    return record.attributes.get("source_task") is not None


class Collator:
    """Tokenizes, truncates, pads and stacks samples (or records, formatted on the fly) into a model batch."""

    def __init__(self, tokenizer, image_size: int, max_src_len: int, max_tgt_len: int,
                 prompt_type: PromptType = "none", instruction: InstructionFormatter | None = None,
                 transform: ImageTransform | None = None):
        if prompt_type not in ("none", "prev_output"):
            raise ValueError(f"prompt_type must be 'none' or 'prev_output', got {prompt_type!r}")
        if max_src_len < 3 or max_tgt_len < 2:
            raise ValueError(f"need max_src_len >= 3 and max_tgt_len >= 2, got {max_src_len} and {max_tgt_len}")
        self.tokenizer, self.image_size = tokenizer, image_size
        self.max_src_len, self.max_tgt_len, self.prompt_type = max_src_len, max_tgt_len, prompt_type
        self.instruction = instruction
        self.transform = transform or ImageTransform(image_size)
        self.bos, self.eos, self.pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
        self.seen = 0
        self.truncated = {"prompt": 0, "target": 0}

    def __call__(self, items: Sequence[Sample | Record]) -> dict[str, Any]:
        samples = self._samples(items)
        self.seen += len(samples)
        prompts = self._encode([s.prompt for s in samples], self.max_prompt_tokens, "prompt")
        targets = self._encode([s.target for s in samples], self.max_tgt_len - 1, "target")  # room for </s>
        sources = [[self.bos, *p, self.eos] for p in prompts]
        if self.prompt_type == "prev_output":
            decoder_inputs = [[self.bos, *p, *t] for p, t in zip(prompts, targets, strict=True)]
            labels = [[IGNORE_INDEX] * len(p) + [*t, self.eos] for p, t in zip(prompts, targets, strict=True)]
        else:
            decoder_inputs = [[self.bos, *t] for t in targets]
            labels = [[*t, self.eos] for t in targets]
        input_ids, attention_mask = self._pad(sources, self.pad)
        decoder_input_ids, decoder_attention_mask = self._pad(decoder_inputs, self.pad)
        labels, _ = self._pad(labels, IGNORE_INDEX)
        pixel_values, patch_masks = self._images(samples)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
                "patch_masks": patch_masks, "decoder_input_ids": decoder_input_ids,
                "decoder_attention_mask": decoder_attention_mask, "labels": labels, "ids": [s.id for s in samples]}

    @property
    def max_prompt_tokens(self) -> int:
        return self.max_src_len - 2  # room for <s> </s>

    def prompt_lengths(self, items: Sequence[Sample | Record]) -> list[int]:
        """Prompt tokens per item as a batch would hold them (after truncation); images are not read."""
        encoded = self.tokenizer([s.prompt for s in self._samples(items)], add_special_tokens=False)["input_ids"]
        return [min(len(ids), self.max_prompt_tokens) for ids in encoded]

    def _samples(self, items: Sequence[Sample | Record]) -> list[Sample]:
        return [item if isinstance(item, Sample) else format_record(item, self.instruction) for item in items]

    def _encode(self, texts: list[str], limit: int, kind: str) -> list[list[int]]:
        """Token ids without special tokens, cut to `limit`; cuts are counted and reported."""
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        cut = sum(len(ids) > limit for ids in encoded)
        if cut:
            self._warn_truncation(kind, cut)
        return [ids[:limit] for ids in encoded]

    def _warn_truncation(self, kind: str, cut: int) -> None:
        before = self.truncated[kind]
        self.truncated[kind] += cut
        # warn at the first cut and whenever the count passes a power of ten, so logs stay short
        if before == 0 or len(str(before)) < len(str(self.truncated[kind])):
            limit = self.max_src_len if kind == "prompt" else self.max_tgt_len
            log.warning("%d of %d %ss so far were longer than %d tokens and were truncated; raise "
                        "data.max_%s_len if the cut part matters", self.truncated[kind], self.seen, kind, limit,
                        "src" if kind == "prompt" else "tgt")

    @staticmethod
    def _pad(sequences: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) right-padded ids and the (B, L) mask of real positions."""
        lengths = np.array([len(s) for s in sequences])
        ids = np.full((len(sequences), lengths.max()), value, dtype=np.int64)
        for row, sequence in enumerate(sequences):
            ids[row, :len(sequence)] = sequence
        mask = np.arange(ids.shape[1]) < lengths[:, None]
        return torch.from_numpy(ids), torch.from_numpy(mask.astype(np.int64))

    def _images(self, samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) pixels, zeros where a sample has no image, and the (B,) mask of samples with one."""
        pixels = torch.zeros((len(samples), 3, self.image_size, self.image_size))
        has_image = torch.zeros(len(samples), dtype=torch.bool)
        for row, sample in enumerate(samples):
            if sample.image is None:
                continue
            image = sample.image if isinstance(sample.image, torch.Tensor) else self.transform(sample.image)
            if tuple(image.shape) != tuple(pixels.shape[1:]):
                raise ValueError(f"sample {sample.id}: image tensor of shape {tuple(image.shape)}, expected "
                                 f"{tuple(pixels.shape[1:])}. Fix: use the same image_size for the dataset "
                                 "transform and the collator")
            pixels[row], has_image[row] = image, True
        return pixels, has_image
