"""Samples without an image in a batch with images: fairseq's patch_masks semantics, which the OFA HF port drops.

OFA's encoder (models/ofa/unify_transformer.py, TransformerEncoder.forward_scriptable) marks every image slot of a
sample with patch_masks False as padding (`image_padding_mask[~patch_masks] = True`), zeroes the embeddings of all
padding slots (`x * (1 - encoder_padding_mask)`), and masks those keys with -inf in every attention
(`key_padding_mask`), the decoder's cross-attention included. The HF port comments the first line out
("Temporary fix of size mismatch"), so its image-less samples attend to the image slots filled from whatever pixels
the batch holds. `fairseq_encoder` below writes that computation out step by step, with the mask built by hand.
"""

import pytest
import torch
import torch.nn.functional as F

from scaling.models.biomedgpt import BiomedGPTConfig, BiomedGPTForConditionalGeneration
from scaling.models.biomedgpt.modeling import image_relative_buckets, token_relative_buckets

BOS, PAD, EOS = 0, 1, 2


@pytest.fixture(scope="module")
def model():
    """Seeded `test`-preset weights, relative tables and NormFormer scales included."""
    torch.manual_seed(0)
    model = BiomedGPTForConditionalGeneration(BiomedGPTConfig.from_preset("test")).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            is_norm = "norm" in name or "_ln" in name or ".bn" in name
            if name.endswith("c_attn") or (is_norm and name.endswith("weight")):
                param.copy_(1 + 0.2 * torch.randn_like(param))
            else:
                param.copy_(0.2 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module")
def batch():
    """Sample 0 has an image and 5 text tokens; sample 1 has no image (its pixels are noise) and 3, padded."""
    input_ids = torch.tensor([[BOS, 11, 12, 13, EOS], [BOS, 21, EOS, PAD, PAD]])
    return {
        "input_ids": input_ids,
        "attention_mask": input_ids.ne(PAD).long(),
        "pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)),
        "patch_masks": torch.tensor([True, False]),
    }


def fairseq_padding_mask(batch: dict, num_patches: int) -> torch.Tensor:
    """encoder_padding_mask (B, N + L), True = padding: all image slots of image-less samples, then text padding."""
    image_padding = torch.zeros(len(batch["patch_masks"]), num_patches, dtype=torch.bool)
    image_padding[~batch["patch_masks"]] = True
    return torch.cat([image_padding, batch["input_ids"].eq(PAD)], dim=1)


def fairseq_layer(layer, x: torch.Tensor, bias: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
    """One pre-LN NormFormer encoder layer (unify_transformer_layer.py, eval mode) with -inf on padded keys."""
    attention, (batch, length, width) = layer.self_attn, x.shape
    heads = attention.num_heads
    h = layer.self_attn_layer_norm(x)
    q, k, v = (
        proj(h).view(batch, length, heads, -1).transpose(1, 2)
        for proj in (attention.q_proj, attention.k_proj, attention.v_proj)
    )
    logits = (q * attention.scaling) @ k.transpose(-1, -2) + bias  # (B, H, S, S)
    logits = logits.masked_fill(padding[:, None, None, :], float("-inf"))  # key_padding_mask
    out = (logits.softmax(-1) @ v) * attention.c_attn[None, :, None, None]  # scale_heads
    out = attention.out_proj(out.transpose(1, 2).reshape(batch, length, width))  # (B, H, S, hd) -> (B, S, d)
    x = x + layer.self_attn_mid_layer_norm(out)  # scale_attn
    h = layer.ffn_layer_norm(F.gelu(layer.fc1(layer.final_layer_norm(x))))  # scale_fc
    return x + layer.fc2(h)


@torch.no_grad()
def fairseq_encoder(encoder, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """OFA's encoder on [image; text] with fairseq's masking, written out; returns (output, padding mask)."""
    config, input_ids = encoder.config, batch["input_ids"]
    text = encoder.layernorm_embedding(encoder.embed_tokens(input_ids) + encoder.type_embedding.weight[0])
    features = encoder.embed_images(batch["pixel_values"])  # (B, C, h, w)
    rows, cols = features.shape[-2:]
    image = encoder.image_proj(features.flatten(2).transpose(1, 2))  # (B, C, N) -> (B, N, C) -> (B, N, d)
    image = encoder.patch_layernorm_embedding(image + encoder.type_embedding.weight[1])
    num_patches, text_len = rows * cols, input_ids.shape[1]
    padding = fairseq_padding_mask(batch, num_patches)
    x = torch.cat([image, text], dim=1) * (1 - padding[..., None].float())
    image_ids = (torch.arange(rows)[:, None] * config.image_bucket_size + torch.arange(cols)[None, :] + 1).flatten()
    text_positions = torch.arange(text_len)
    positions = torch.cat(
        [
            encoder.image_pos_ln(encoder.embed_image_positions(image_ids)),
            encoder.pos_ln(encoder.embed_positions(text_positions)),
        ]
    )  # (S, d)
    heads = config.encoder_attention_heads
    pos_q = encoder.pos_q_linear(positions).view(len(positions), heads, -1).transpose(0, 1) * encoder.pos_scaling
    pos_k = encoder.pos_k_linear(positions).view(len(positions), heads, -1).transpose(0, 1)
    absolute = pos_q @ pos_k.transpose(1, 2)  # (H, S, S)
    token_buckets = token_relative_buckets(
        text_positions, text_positions, config.token_bucket_size, config.token_bucket_positions
    )
    image_buckets = image_relative_buckets(image_ids, image_ids, config.image_bucket_size)
    for i, layer in enumerate(encoder.layers):
        bias = absolute.clone()
        bias[:, num_patches:, num_patches:] += (
            encoder.token_rel_pos_table_list[i].weight[token_buckets].permute(2, 0, 1)
        )
        bias[:, :num_patches, :num_patches] += (
            encoder.image_rel_pos_table_list[i].weight[image_buckets].permute(2, 0, 1)
        )
        x = fairseq_layer(layer, x, bias, padding)
    return encoder.layer_norm(x), padding


@torch.no_grad()
def test_encoder_masks_the_image_slots_of_image_less_samples_like_fairseq(model, batch):
    encoder = model.get_encoder()
    ours = encoder(**batch)
    expected, padding = fairseq_encoder(encoder, batch)
    assert padding[1, :4].all() and not padding[0, :4].any()  # a 32 px image gives 2 x 2 patches
    assert torch.equal(ours.attention_mask, ~padding)
    assert (ours.last_hidden_state - expected).abs().max().item() <= 1e-5


@torch.no_grad()
def test_image_less_sample_decodes_as_if_alone_without_image(model, batch):
    """Masked image slots leave nothing behind: sample 1 gets the logits of a text-only run of itself."""
    decoder_input_ids = torch.tensor([[BOS, 41, 42, 43], [BOS, 51, 52, 53]])
    mixed = model(**batch, decoder_input_ids=decoder_input_ids).logits
    alone = model(input_ids=batch["input_ids"][1:, :3], decoder_input_ids=decoder_input_ids[1:]).logits
    assert (mixed[1] - alone[0]).abs().max().item() <= 1e-5
    # the HF port's behaviour (patch_masks ignored) lets sample 1 see the noise pixels, and its output moves
    unmasked = model(**{**batch, "patch_masks": None}, decoder_input_ids=decoder_input_ids).logits
    assert (unmasked[1] - alone[0]).abs().max().item() > 1e-2
    assert (unmasked[0] - mixed[0]).abs().max().item() <= 1e-5
