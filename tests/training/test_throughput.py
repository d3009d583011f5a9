"""The benchmark's instruments on the test preset: FLOPs counted on the meta device against a counted CPU step, the
split by part, BART of the same dimensions. Timings are not asserted (they depend on the machine)."""

from __future__ import annotations

import torch

from scaling.models.biomedgpt import BiomedGPTConfig, BiomedGPTForConditionalGeneration
from scaling.training.loop import loss_step
from scaling.training.throughput import (
    SHAPES,
    BatchShape,
    bart_twin,
    candidate_answers,
    counted_flops,
    step_flops,
    synthetic_batches,
    transformers_loss,
)

CONFIG = BiomedGPTConfig.from_preset("test")
CPU = torch.device("cpu")


def cpu_step_flops(shape: BatchShape) -> int:
    """FLOPs of the recipes' training loss (labelled positions selected) and its backward, run on the CPU."""
    torch.manual_seed(0)
    model = BiomedGPTForConditionalGeneration(CONFIG).train()
    batch = synthetic_batches(CONFIG, shape, CPU)[0]
    return counted_flops(lambda: loss_step(model, batch).backward())


def test_meta_device_flops_equal_a_real_training_step_and_split_into_the_parts():
    shape = BatchShape(batch=2, image_size=32, src_len=16, tgt_len=4)
    flops = step_flops(CONFIG, shape)
    assert flops["total"] == cpu_step_flops(shape)
    assert flops["total"] == flops["resnet"] + flops["encoder"] + flops["decoder"] + flops["lm_head"]
    assert min(flops.values()) > 0
    # the LM head: logits (2 n d V) forward, then the gradients of its input and of the tied weight
    assert flops["lm_head"] == 3 * 2 * (shape.batch * shape.tgt_len) * CONFIG.d_model * CONFIG.vocab_size
    resnet = BiomedGPTForConditionalGeneration(CONFIG).model.encoder.embed_images
    pixels = synthetic_batches(CONFIG, shape, CPU)[0]["pixel_values"]
    assert flops["resnet"] == counted_flops(lambda: resnet(pixels).sum().backward())


def test_text_only_shape_has_no_image_and_no_resnet_flops():
    shape = BatchShape(batch=2, image_size=0, src_len=16, tgt_len=4)
    batch = synthetic_batches(CONFIG, shape, CPU)[0]
    assert "pixel_values" not in batch and shape.image_tokens == 0
    flops = step_flops(CONFIG, shape)
    assert flops["resnet"] == 0 and flops["total"] == cpu_step_flops(shape)
    assert SHAPES["text"].image_size == 0 and SHAPES["vqa"].image_tokens == 576 and SHAPES["caption"].image_size == 480


def test_bart_twin_has_the_dimensions_of_the_model():
    bart = bart_twin(CONFIG)
    for ours, theirs in (("d_model", "d_model"), ("encoder_layers", "encoder_layers"),
                         ("decoder_layers", "decoder_layers"), ("encoder_ffn_dim", "encoder_ffn_dim"),
                         ("decoder_attention_heads", "decoder_attention_heads"), ("vocab_size", "vocab_size"),
                         ("max_positions", "max_position_embeddings")):
        assert getattr(CONFIG, ours) == getattr(bart.config, theirs), ours
    assert bart.get_output_embeddings().weight is bart.get_input_embeddings().weight
    shape = BatchShape(batch=2, image_size=0, src_len=16, tgt_len=4)
    batch = synthetic_batches(CONFIG, shape, CPU)[0]
    bart_flops = counted_flops(lambda: transformers_loss(bart.train(), batch).backward())
    # the same transformer work; OFA adds only the position-bias projections
    assert bart_flops < step_flops(CONFIG, shape)["total"] < 1.1 * bart_flops


def test_candidate_answers_end_in_eos_and_the_trie_allows_exactly_their_first_tokens():
    candidates = candidate_answers(CONFIG.vocab_size, CONFIG.eos_token_id, 50)
    assert len(candidates.token_ids) == 50
    assert all(1 <= len(ids) - 1 <= 4 and ids[-1] == CONFIG.eos_token_id for ids in candidates.token_ids)
    assert set(candidates.trie.allowed([])) == {ids[0] for ids in candidates.token_ids}
