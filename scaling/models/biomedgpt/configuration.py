"""BiomedGPT/OFA configuration and the size presets.

Preset shapes come from the fairseq arch functions in OFA-Sys/OFA `models/ofa/ofa.py` (`ofa_tiny`, `ofa_medium`,
`ofa_base`, `ofa_large`, `ofa_huge`; taokz/BiomedGPT ships the same file). BiomedGPT-S/M/B are `ofa_tiny/medium/base`
(33M/93M/182M). BiomedGPT-Large/XLarge (arXiv 2505.17436, "up to 930M parameters") are taken to be the `ofa_large`
and `ofa_huge` shapes: an inference from the parameter counts, not from the paper's architecture table.
"""

from dataclasses import field
from typing import Any

from transformers import PretrainedConfig

# Tokens: 4 fairseq specials + 50,260 BPE lines + <mask> = 50,265, then 8192 <code_i> and 1000 <bin_i>.
OFA_VOCAB_SIZE = 59_457

RESNET50 = [3, 4, 6]  # ofa.py: resnet_type == "resnet50" -> ResNet([3, 4, 6]) (stages 1-3 only, no layer4)
RESNET101 = [3, 4, 23]
RESNET152 = [3, 8, 36]


def _shape(layers: int, d_model: int, heads: int, resnet_layers: list[int], decoder_layers: int | None = None):
    """Encoder/decoder shape with OFA's fixed ratios: FFN = 4 * d_model, same heads in encoder and decoder."""
    return dict(
        encoder_layers=layers,
        decoder_layers=decoder_layers or layers,
        d_model=d_model,
        encoder_ffn_dim=4 * d_model,
        decoder_ffn_dim=4 * d_model,
        encoder_attention_heads=heads,
        decoder_attention_heads=heads,
        resnet_layers=resnet_layers,
    )


PRESETS: dict[str, dict[str, Any]] = {
    # ofa.py ofa_tiny_architecture; OFA README 33M; BiomedGPT-S.
    "tiny": _shape(4, 256, 4, RESNET50),
    # ofa.py ofa_medium_architecture; OFA README 93M; BiomedGPT-M.
    "medium": _shape(4, 512, 8, RESNET101),
    # ofa.py ofa_base_architecture; OFA README 180M; BiomedGPT-B (182M).
    "base": _shape(6, 768, 12, RESNET101),
    # ofa.py ofa_large_architecture; OFA README 470M; presumed BiomedGPT-Large.
    "large": _shape(12, 1024, 16, RESNET152),
    # ofa.py ofa_huge_architecture (24 encoder / 12 decoder layers); OFA README 930M; presumed BiomedGPT-XLarge.
    "xlarge": _shape(24, 1280, 16, RESNET152, decoder_layers=12),
    # Not an OFA size: trains on a 2-core CPU in minutes (embedded default job, recipe tests). Trained from scratch,
    # it needs a wider init than 0.02: otherwise the decoder's cross-attention locks onto fixed positions through the
    # shared absolute-position bias and every yes/no answer stays at the prior. With a 16-channel ResNet stem the
    # default job often never learnt to see the lesions (3 of 5 runs); with 32 it did in both runs measured. No
    # dropout: on a budget of ~2 epochs it only slowed learning (and sampling its masks cost a fifth of each step).
    "mini": {
        **_shape(2, 128, 4, [1, 1, 1]),
        "dropout": 0.0,
        "init_std": 0.08,
        "resnet_width": 32,
        "image_size": 64,
        "code_image_size": 64,
        "max_positions": 256,
        "token_bucket_size": 64,
        "image_bucket_size": 8,
    },
    # Not an OFA size: smallest shape exercising every code path, for unit tests.
    "test": {
        **_shape(2, 64, 4, [1, 1, 1]),
        "vocab_size": 1000,
        "resnet_width": 8,
        "image_size": 32,
        "code_image_size": 32,
        "max_positions": 128,
        "token_bucket_size": 16,
        "image_bucket_size": 6,
    },
}


class BiomedGPTConfig(PretrainedConfig):
    """Configuration of the OFA encoder-decoder used by BiomedGPT (HF-port field names where they exist)."""

    model_type = "biomedgpt"
    keys_to_ignore_at_inference = ["cache"]
    attribute_map = {
        "hidden_size": "d_model",
        "num_attention_heads": "decoder_attention_heads",
        "num_hidden_layers": "decoder_layers",
    }

    vocab_size: int = OFA_VOCAB_SIZE
    d_model: int = 768
    encoder_layers: int = 6
    decoder_layers: int = 6
    encoder_attention_heads: int = 12
    decoder_attention_heads: int = 12
    encoder_ffn_dim: int = 3072
    decoder_ffn_dim: int = 3072
    activation_function: str = "gelu"
    # ResNet embedder: blocks per stage (layer1..3) and stem width (64 in every OFA size; smaller for test presets).
    resnet_layers: list[int] = field(default_factory=lambda: list(RESNET101))
    resnet_width: int = 64
    # Default input resolution; any multiple of 16 up to 16 * image_bucket_size works.
    image_size: int = 256
    max_positions: int = 1024
    token_bucket_size: int = 256
    # max_position of OFA's token-bucket formula: OFA fixes it at 1024 whatever max_source_positions is
    # (unify_transformer.py make_token_bucket_position); None = max_positions.
    token_bucket_max_position: int | None = None
    image_bucket_size: int = 42
    # Attention logits are scaled by (head_dim * attn_scale_factor) ** -0.5.
    attn_scale_factor: float = 2.0
    # NormFormer extras (fairseq --scale-attn --scale-fc --scale-heads): mid layer norms and per-head c_attn.
    normformer: bool = True
    # Size of the VQ-GAN code image; the decoder's code position grid is (code_image_size // 8) squared.
    code_image_size: int = 128
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    encoder_drop_path_rate: float = 0.0
    decoder_drop_path_rate: float = 0.0
    resnet_drop_path_rate: float = 0.0
    label_smoothing: float = 0.0
    init_std: float = 0.02
    use_cache: bool = True
    pad_token_id: int | None = 1
    bos_token_id: int | None = 0
    eos_token_id: int | None = 2
    # OFA's decoder starts with <s> (bos), unlike BART's </s>.
    decoder_start_token_id: int | None = 0
    is_encoder_decoder: bool = True
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        """Validate the shape after the dataclass fields are set."""
        super().__post_init__(**kwargs)
        problems = self.problems()
        if problems:
            raise ValueError("invalid BiomedGPTConfig: " + "; ".join(problems))

    def problems(self) -> list[str]:
        """Every inconsistency in the shape, as readable sentences."""
        found = []
        for side in ("encoder", "decoder"):
            heads = getattr(self, f"{side}_attention_heads")
            if self.d_model % heads:
                found.append(f"d_model {self.d_model} is not divisible by {side}_attention_heads {heads}")
        if self.encoder_attention_heads != self.decoder_attention_heads:
            found.append("encoder and decoder must use the same number of heads (shared position bias shapes)")
        if len(self.resnet_layers) != 3:
            found.append(f"resnet_layers must list 3 stages (layer1..3), got {self.resnet_layers}")
        if self.image_size % 16 or self.image_size // 16 > self.image_bucket_size:
            found.append(
                f"image_size {self.image_size} must be a multiple of 16 and at most 16 * image_bucket_size "
                f"({16 * self.image_bucket_size})"
            )
        if self.code_image_size // 8 > self.image_bucket_size:
            found.append(
                f"code_image_size {self.code_image_size} gives a {self.code_image_size // 8}-wide code grid, larger "
                f"than image_bucket_size {self.image_bucket_size}"
            )
        if self.token_bucket_size > self.token_bucket_positions:
            found.append(
                f"token_bucket_size {self.token_bucket_size} exceeds the token-bucket range {self.token_bucket_positions} "
                "(token_bucket_max_position, else max_positions)"
            )
        return found

    @property
    def token_bucket_positions(self) -> int:
        """The max_position of the token-bucket formula: token_bucket_max_position, else max_positions."""
        return self.token_bucket_max_position or self.max_positions

    @property
    def resnet_out_channels(self) -> int:
        """Channels of the ResNet's layer3 output (1024 for the OFA stem width 64)."""
        return self.resnet_width * 16

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "BiomedGPTConfig":
        """Build a config from a named preset, with field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown BiomedGPT preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})
