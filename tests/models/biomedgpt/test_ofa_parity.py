"""Parity with the OFA reference implementation on seeded weights (real tables: 256 token / 42 image buckets).

The expected logits were computed once with the OFA transformers port (OFA-Sys/OFA branch
`feature/add_transformers`, `transformers/src/transformers/models/ofa/modeling_ofa.py`), loading the very same
seeded parameters under its own key names (ours minus the `model.` prefix), the same inputs, in fp32 on CPU.
Both runs use patch_masks all True, where the port and fairseq agree.
"""

import math
import zlib

import torch

from scaling.models.biomedgpt import BiomedGPTConfig, BiomedGPTForConditionalGeneration

# logits[:, :, :4] of OFAModel with code_masks=[False, True] and sample 1 text-padded.
WITH_IMAGE = [
    [
        [4.2840, -0.7324, 1.7287, -0.6766],
        [-1.1632, 2.3471, 0.5950, -0.3235],
        [-0.9088, -0.5846, 1.5711, -1.9044],
        [-1.8538, -0.2686, -0.9538, 0.1279],
        [-3.2569, -0.2317, -0.1175, 0.2865],
        [-2.7299, 0.6781, -0.7497, -1.0793],
    ],
    [
        [2.4127, -1.0917, 1.9855, -1.8909],
        [-1.3830, -0.3230, 0.2028, -1.1134],
        [-0.5501, 0.6344, 1.1485, -0.0046],
        [-1.9062, 0.3961, -0.7039, -1.4970],
        [-1.7015, -0.1784, -0.4245, 2.8692],
        [0.0867, -0.5126, 1.7831, -1.0794],
    ],
]
# logits[:, :, :4] of OFAModel without an image.
TEXT_ONLY = [
    [
        [4.3339, -0.2943, 1.3026, -0.4401],
        [0.0769, 2.1120, 0.3766, -0.2067],
        [-1.4946, -0.4132, 1.2611, -2.0350],
        [-0.8624, -0.2665, -0.1848, 1.1882],
        [-2.4357, 0.6626, -0.2583, 0.1004],
        [-2.5077, 0.7080, -0.7862, -1.1951],
    ],
    [
        [3.5705, 1.4192, 1.8215, -1.2957],
        [-1.6569, -0.2097, 0.2109, -2.2237],
        [-1.3505, 1.2386, 0.4515, -0.1350],
        [-2.5118, 0.2563, -0.8750, 0.2543],
        [-2.0816, 1.0578, 0.2100, 3.3992],
        [-1.7541, 1.9198, 1.6442, 0.4501],
    ],
]


def seeded_value(name: str, shape: torch.Size) -> torch.Tensor:
    """Deterministic value per parameter name, independent of module order."""
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(zlib.crc32(name.encode())))
    if "embed_images" in name and len(shape) == 4:  # convs: keep activations bounded through 16 bottlenecks
        return noise * math.sqrt(1.0 / math.prod(shape[1:]))
    is_norm = "norm" in name or "_ln" in name or "bn" in name or "downsample.1" in name
    if name.endswith("c_attn") or (is_norm and name.endswith("weight")):
        return 1 + 0.2 * noise
    return 0.2 * noise


def ofa_sized_model() -> BiomedGPTForConditionalGeneration:
    """Test-preset widths with OFA's ResNet-50 stages and full-size position tables."""
    config = BiomedGPTConfig.from_preset(
        "test",
        resnet_layers=[3, 4, 6],
        resnet_width=64,
        token_bucket_size=256,
        image_bucket_size=42,
        max_positions=1024,
        code_image_size=128,
        dropout=0.0,
    )
    model = BiomedGPTForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(seeded_value(name.removeprefix("model."), param.shape))
    return model


def test_logits_match_the_ofa_transformers_port():
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(4, 1000, (2, 9), generator=g)
    input_ids[:, 0], input_ids[:, -1] = 0, 2
    input_ids[1, 4], input_ids[1, 5:] = 2, 1
    pixel_values = torch.randn(2, 3, 64, 64, generator=g)
    decoder_input_ids = torch.randint(4, 1000, (2, 6), generator=g)
    decoder_input_ids[:, 0] = 0
    model = ofa_sized_model()
    with torch.no_grad():
        with_image = model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            patch_masks=torch.tensor([True, True]),
            decoder_input_ids=decoder_input_ids,
            code_masks=torch.tensor([False, True]),
        ).logits
        text_only = model(input_ids=input_ids, decoder_input_ids=decoder_input_ids).logits
    assert torch.allclose(with_image[:, :, :4], torch.tensor(WITH_IMAGE), atol=2e-4)
    assert torch.allclose(text_only[:, :, :4], torch.tensor(TEXT_ONLY), atol=2e-4)
