"""Per-GPU memory of training a preset under ZeRO, precision and PEFT, estimated before any run.

    est = estimate_memory("large", zero_stage=3, gpus=8, offload="cpu", peft="lora", batch=8, image_size=480)
    est.total, est.fits(parse_size("80GB"))
    fit(parse_size("80GB"), "xlarge", gpus=8)     # every (zero, offload, peft, checkpointing, batch) that fits

Model states follow the ZeRO paper (Rajbhandari et al. 2020, §3): with Ψ parameters and mixed precision a GPU holds
2Ψ bytes of 16-bit weights, 2Ψ of 16-bit gradients and 12Ψ of optimizer states (fp32 master weights, Adam m and v);
without mixed precision 4Ψ + 4Ψ + 8Ψ. Stage 1 partitions the optimizer states over the GPUs, stage 2 also the
gradients, stage 3 also the weights; CPU offload moves the optimizer states (and, at stage 3, the weights) to host
memory. Under PEFT the frozen base keeps only its weights; gradients and optimizer states exist for the adapters.
Activations are counted tensor by tensor from the architecture (see `activation_bytes`).
"""

from __future__ import annotations

import functools
import itertools
import re
from dataclasses import asdict, dataclass

import torch
from torch import nn

from scaling.training.memory import format_bytes

PRECISIONS = ("fp32", "bf16", "fp16")
PEFT_METHODS = ("none", "lora", "dora", "ia3", "prefix", "ptv2", "qlora")
OFFLOAD_TARGETS = ("none", "cpu")
ZERO_STAGES = (0, 1, 2, 3)

USABLE_FRACTION = 0.9
"""Share of a GPU's memory an estimate may fill; the rest goes to the CUDA context, allocator fragmentation and
communication buckets, which the estimate does not model."""

NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
"""Bytes per 4-bit NF4 weight: two per byte, an 8-bit absmax per 64-block, an fp32 scale per 256 absmax (double quant)."""

BODY_PEAK_FACTOR = 1.5
"""Peak live bytes over the bytes saved for backward in the ResNet and transformer layers (backward holds a stage's
gradients and temporaries beside what is still saved); calibrated on CPU runs of the tiny preset, checked on others in
tests/training/test_memory.py."""


@dataclass(frozen=True)
class ParameterCount:
    """Parameters of a preset under a PEFT method (tied weights once)."""

    total: int
    trainable: int
    quantized: int
    """Frozen base weights stored in 4 bits (QLoRA); counted in `total`."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Per-GPU bytes of one training configuration."""

    preset: str
    zero_stage: int
    gpus: int
    offload: str
    peft: str
    precision: str
    batch: int
    image_size: int
    src_len: int
    tgt_len: int
    gradient_checkpointing: bool
    total_params: int
    trainable_params: int
    parameters: int
    gradients: int
    optimizer_states: int
    activations_full: int
    """Activations of one micro-batch without gradient checkpointing."""
    activations_checkpointed: int
    """Activations of one micro-batch with per-layer gradient checkpointing."""
    cpu_offloaded: int
    """Bytes moved to host memory per rank by ZeRO-Offload."""

    @property
    def activations(self) -> int:
        return self.activations_checkpointed if self.gradient_checkpointing else self.activations_full

    @property
    def model_states(self) -> int:
        return self.parameters + self.gradients + self.optimizer_states

    @property
    def total(self) -> int:
        return self.model_states + self.activations

    def fits(self, gpu_memory: int) -> bool:
        """Whether the estimate stays within the usable share of a GPU of `gpu_memory` bytes."""
        return self.total <= USABLE_FRACTION * gpu_memory

    def as_dict(self) -> dict:
        return {**asdict(self), "activations": self.activations, "model_states": self.model_states,
                "total": self.total}



def parse_size(text: str | int) -> int:
    """'80GB', '80G', '24 GiB', '512MB' or a byte count -> bytes (GB means GiB, as GPU vendors' sizes do)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?B)?\s*", str(text), flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"cannot read memory size {text!r}; write e.g. 80GB, 24GiB or 512MB")
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[match.group(2).upper()]
    return int(float(match.group(1)) * scale)



# ---------------------------------------------------------------------------------------------------------------------
# Parameters and model states


def _meta_model(preset: str) -> nn.Module:
    """The preset's model with parameters on the meta device: exact shapes, no memory."""
    from scaling.models.biomedgpt.configuration import BiomedGPTConfig
    from scaling.models.biomedgpt.modeling import BiomedGPTForConditionalGeneration

    with torch.device("meta"):
        return BiomedGPTForConditionalGeneration(BiomedGPTConfig.from_preset(preset))


def peft_args_for(method: str):
    """The PeftArgs an estimate assumes for `method`: it adapts every component it can (prefix methods freeze the
    ResNet, which has no attention); qlora is LoRA over NF4 base weights."""
    from scaling.config import PeftArgs

    if method == "qlora":
        return PeftArgs(vision="lora", encoder="lora", decoder="lora", quantize="nf4")
    vision = method if method in ("lora", "dora", "ia3") else "freeze"
    return PeftArgs(vision=vision, encoder=method, decoder=method)


@functools.lru_cache(maxsize=64)
def count_parameters(preset: str, peft: str = "none") -> ParameterCount:
    """Total, trainable and 4-bit parameters of a preset under a PEFT method, from the real model built on meta."""
    _check_choice("peft", peft, PEFT_METHODS)
    model = _meta_model(preset)
    if peft == "none":
        total = sum(p.numel() for p in model.parameters())
        return ParameterCount(total=total, trainable=total, quantized=0)
    from scaling.adapters import apply_peft, count_trainable

    args = peft_args_for(peft)
    # Quantising needs real weights; on meta, count the linears that quantize_frozen_linears would replace.
    apply_peft(model, peft_args_for("lora") if peft == "qlora" else args)
    counts = count_trainable(model)["all"]
    quantized = 0
    if peft == "qlora":
        tied = model.get_input_embeddings().weight
        quantized = sum(m.weight.numel() for m in model.modules()
                        if type(m) is nn.Linear and not m.weight.requires_grad and m.weight is not tied)
    return ParameterCount(total=int(counts["total"]), trainable=int(counts["trainable"]), quantized=quantized)


def model_state_bytes(
    params: ParameterCount, precision: str = "bf16", zero_stage: int = 0, gpus: int = 1, offload: str = "none"
) -> dict[str, int]:
    """Per-GPU bytes of weights, gradients and optimizer states, and the bytes offloaded to the host, per ZeRO stage."""
    _check_choice("precision", precision, PRECISIONS)
    _check_choice("zero_stage", zero_stage, ZERO_STAGES)
    _check_choice("offload", offload, OFFLOAD_TARGETS)
    if offload != "none" and zero_stage == 0:
        raise ValueError("offload needs ZeRO stage 1, 2 or 3 (DeepSpeed offloads partitioned optimizer states)")
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, got {gpus}")
    # Mixed precision: 16-bit weights + 16-bit grads + (fp32 master, Adam m, Adam v); fp32: weights, grads, m, v.
    weight_bytes, grad_bytes, optimizer_bytes = (4, 4, 8) if precision == "fp32" else (2, 2, 12)
    states = {
        "parameters": weight_bytes * (params.total - params.quantized) + NF4_BYTES * params.quantized,
        "gradients": grad_bytes * params.trainable,
        "optimizer_states": optimizer_bytes * params.trainable,
    }
    partitioned = ["optimizer_states", "gradients", "parameters"][:zero_stage]
    states = {k: v / gpus if k in partitioned else v for k, v in states.items()}
    offloaded = 0.0
    if offload == "cpu":
        moved = ["optimizer_states"] + (["parameters"] if zero_stage == 3 else [])
        offloaded = sum(states[k] for k in moved)
        states.update({k: 0 for k in moved})
    return {**{k: int(round(v)) for k, v in states.items()}, "cpu_offloaded": int(round(offloaded))}


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")


# ---------------------------------------------------------------------------------------------------------------------
# Activations


def activation_bytes(
    config,
    batch: int,
    image_size: int,
    src_len: int,
    tgt_len: int,
    precision: str = "bf16",
    gradient_checkpointing: bool = False,
    device: str = "cuda",
) -> dict[str, int]:
    """Peak activation bytes of one micro-batch's forward + backward, per part and in total (parts: vision,
    embeddings, encoder, decoder, head, transient).

    Counted from the tensors autograd saves in `modeling.py` with the model in its compute dtype (DeepSpeed casts the
    module; fp32 otherwise), plus the measured transient peak (`BODY_PEAK_FACTOR`, the cross-entropy's temporaries).
    Encoder length S = (image_size / 16)^2 patches + src_len text tokens; decoder length T. Attention biases are
    counted per sample, (B, H, S, S), as text padding makes them (an unpadded batch shares one (1, H, S, S) bias, so
    the estimate is an upper bound there).
    Attention carries a learned additive bias, so its kernel keeps: on CUDA (memory-efficient SDPA) q, k, v, the bias
    and the log-sum-exp; on CPU (math SDPA, the only kernel with a bias gradient there) fp32 copies of q, k, v and the
    fp32 probabilities. Gradient checkpointing (per layer) keeps each layer's inputs (hidden states and its bias) and
    recomputes one layer at a time; the ResNet and the head are not checkpointed.
    """
    _check_choice("precision", precision, PRECISIONS)
    _check_choice("device", device, ("cuda", "cpu"))
    a = 4 if precision == "fp32" else 2  # bytes of the compute dtype
    B, d, H = batch, config.d_model, config.encoder_attention_heads
    patches = (image_size // 16) ** 2
    S, T = patches + src_len, tgt_len
    cuda = device == "cuda"

    # One encoder layer: 9 d-sized tensors (LN inputs/outputs, attention output, out_proj/fc1 inputs, residual branch),
    # q/k/v for attention, 3 FFN-sized ones (fc1 output, GELU output, NormFormer LN output).
    qkv = 3 * d * a if cuda else 3 * d * 4
    scores = (a * S * S + 4 * S) if cuda else 4 * S * S  # per head: bias + lse, or fp32 probabilities
    encoder_layer = B * S * (9 * d * a + qkv + 3 * config.encoder_ffn_dim * a) + B * H * scores
    # One decoder layer: self- and cross-attention over T queries, cross keys/values over the S encoder states.
    dec_qkv = 4 * d * a if cuda else 4 * d * 4
    dec_scores = (a * T * (T + S) + 8 * T) if cuda else 4 * T * (T + S)
    cross_kv = B * S * d * (2 * a if cuda else 8)  # per layer; the encoder output itself is shared (in "embeddings")
    decoder_layer = B * T * (15 * d * a + dec_qkv + 3 * config.decoder_ffn_dim * a) + B * H * dec_scores + cross_kv

    parts = {
        "vision": resnet_activation_bytes(config, B, image_size, a) + B * patches * config.resnet_out_channels * a,
        # Embedding outputs, the encoder output, the shared absolute position bias and the relative-bucket indices.
        "embeddings": 5 * B * (S + T) * d * a + B * H * S * S * a + 8 * (S * S + T * T),
    }
    if gradient_checkpointing:
        kept_encoder = B * S * d * a + B * H * S * S * a  # layer input and its bias
        kept_decoder = B * T * d * a + B * H * T * T * a
        parts["encoder"] = config.encoder_layers * kept_encoder + encoder_layer
        parts["decoder"] = config.decoder_layers * kept_decoder + B * H * T * S * a + decoder_layer
    else:
        parts["encoder"] = config.encoder_layers * encoder_layer
        parts["decoder"] = config.decoder_layers * decoder_layer
    body = sum(parts.values())
    logits = B * T * config.vocab_size
    parts["head"] = 4 * logits  # the cross-entropy's fp32 log-softmax
    # Transient peak, the larger of: at the cross-entropy, the logits and their fp32 copy / fp32 gradient beside the
    # log-softmax (~8 bytes per logit, measured); in the body's backward, a stage's gradients and temporaries.
    parts["transient"] = int(max(8 * logits, (BODY_PEAK_FACTOR - 1) * body))
    return {**parts, "total": sum(parts.values())}


def resnet_activation_bytes(config, batch: int, image_size: int, dtype_bytes: int) -> int:
    """Feature maps the ResNet (stem + bottleneck stages 1-3) saves for backward, in bytes."""
    width = config.resnet_width
    side = image_size // 2
    # Stem: the image (conv input), BN input and ReLU output at /2, max-pool indices (int64) and output at /4.
    elements = 3 * image_size**2 + 2 * width * side**2
    side //= 2
    elements += width * side**2
    index_bytes = 8 * width * side**2
    in_channels = width
    for stage, (blocks, stride) in enumerate(zip(config.resnet_layers, (1, 2, 2), strict=True), start=1):
        planes = width * 2 ** (stage - 1)
        for block in range(blocks):
            out_side = side // stride if block == 0 else side
            # conv1 output + ReLU at the input size; conv2/ReLU (planes) and conv3/ReLU (4 planes) at the output size.
            elements += 2 * planes * side**2 + 10 * planes * out_side**2
            if block == 0 and (stride != 1 or in_channels != 4 * planes):
                elements += 4 * planes * out_side**2  # downsample conv output (BN input)
            side = out_side
        in_channels = 4 * planes
    return batch * (elements * dtype_bytes + index_bytes)


# ---------------------------------------------------------------------------------------------------------------------
# Whole configurations


def estimate_memory(
    preset: str,
    zero_stage: int = 0,
    gpus: int = 1,
    offload: str = "none",
    peft: str = "none",
    precision: str = "bf16",
    batch: int = 8,
    image_size: int | None = None,
    src_len: int = 128,
    tgt_len: int = 32,
    gradient_checkpointing: bool = False,
    device: str = "cuda",
) -> MemoryEstimate:
    """Per-GPU memory of training `preset` with one configuration (batch = micro-batch per GPU)."""
    from scaling.models.biomedgpt.configuration import BiomedGPTConfig

    if batch < 1 or src_len < 1 or tgt_len < 1:
        raise ValueError(f"batch, src_len and tgt_len must be >= 1, got {batch}, {src_len}, {tgt_len}")
    config = BiomedGPTConfig.from_preset(preset, **({"image_size": image_size} if image_size else {}))
    params = count_parameters(preset, peft)
    states = model_state_bytes(params, precision, zero_stage, gpus, offload)
    shape = (config, batch, config.image_size, src_len, tgt_len, precision)
    return MemoryEstimate(
        preset=preset, zero_stage=zero_stage, gpus=gpus, offload=offload, peft=peft, precision=precision,
        batch=batch, image_size=config.image_size, src_len=src_len, tgt_len=tgt_len,
        gradient_checkpointing=gradient_checkpointing,
        total_params=params.total, trainable_params=params.trainable,
        parameters=states["parameters"], gradients=states["gradients"], optimizer_states=states["optimizer_states"],
        activations_full=activation_bytes(*shape, gradient_checkpointing=False, device=device)["total"],
        activations_checkpointed=activation_bytes(*shape, gradient_checkpointing=True, device=device)["total"],
        cpu_offloaded=states["cpu_offloaded"],
    )


def fit(
    gpu_memory: int | str,
    preset: str,
    gpus: int = 1,
    precision: str = "bf16",
    image_size: int | None = None,
    src_len: int = 128,
    tgt_len: int = 32,
    batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64),
    peft_methods: tuple[str, ...] = PEFT_METHODS,
) -> list[MemoryEstimate]:
    """Every (ZeRO stage, offload, PEFT, gradient checkpointing, batch) that fits, cheapest memory first per batch.

    Only the largest fitting batch of each (stage, offload, peft, checkpointing) combination is listed.
    """
    limit = parse_size(gpu_memory)
    found = []
    combos = itertools.product(ZERO_STAGES, OFFLOAD_TARGETS, peft_methods, (False, True))
    for stage, offload, peft, checkpointing in combos:
        if offload != "none" and stage == 0:
            continue
        fitting = [
            est for batch in batches
            if (est := estimate_memory(preset, stage, gpus, offload, peft, precision, batch, image_size, src_len,
                                       tgt_len, checkpointing)).fits(limit)
        ]
        if fitting:
            found.append(fitting[-1])
    return sorted(found, key=lambda e: (-e.batch, e.total))


# ---------------------------------------------------------------------------------------------------------------------
# Tables


def estimate_table(est: MemoryEstimate, gpu_memory: int | None = None):
    """A rich table of one estimate: per-GPU bytes per part, host bytes, and the verdict for `gpu_memory`."""
    from rich.table import Table

    title = (f"{est.preset} · ZeRO-{est.zero_stage} × {est.gpus} GPU · offload {est.offload} · peft {est.peft} · "
             f"{est.precision} · batch {est.batch} · {est.image_size}px · src {est.src_len} · tgt {est.tgt_len}")
    table = Table(title=title, title_justify="left")
    table.add_column("per GPU")
    table.add_column("bytes", justify="right")
    table.add_column("note")
    trainable = f"{est.trainable_params:,} of {est.total_params:,} parameters trainable"
    table.add_row("parameters", format_bytes(est.parameters), f"{est.total_params:,} parameters")
    table.add_row("gradients", format_bytes(est.gradients), trainable)
    table.add_row("optimizer states", format_bytes(est.optimizer_states), "fp32 master weights + Adam m, v")
    table.add_row("activations", format_bytes(est.activations_full), "without gradient checkpointing",
                  style=None if not est.gradient_checkpointing else "dim")
    table.add_row("activations (checkpointed)", format_bytes(est.activations_checkpointed),
                  "with gradient checkpointing", style=None if est.gradient_checkpointing else "dim")
    checkpointing = "with" if est.gradient_checkpointing else "without"
    table.add_row("total", format_bytes(est.total), f"{checkpointing} gradient checkpointing", style="bold")
    if est.cpu_offloaded:
        table.add_row("host memory (offload)", format_bytes(est.cpu_offloaded), "per rank, in CPU RAM")
    if gpu_memory:
        verdict = "fits" if est.fits(gpu_memory) else "does NOT fit"
        table.add_row("verdict", verdict, f"{format_bytes(gpu_memory)} GPU, {USABLE_FRACTION:.0%} usable",
                      style="green" if est.fits(gpu_memory) else "red")
    return table


def fit_table(estimates: list[MemoryEstimate], gpu_memory: int):
    """A rich table of the configurations that fit a GPU, largest batch first."""
    from rich.table import Table

    table = Table(title=f"configurations that fit {format_bytes(gpu_memory)} ({USABLE_FRACTION:.0%} usable)",
                  title_justify="left")
    for column in ("ZeRO", "offload", "peft", "checkpointing", "max batch", "per-GPU total", "host (offload)"):
        table.add_column(column, justify="right" if column in ("max batch", "per-GPU total") else "left")
    for est in estimates:
        table.add_row(str(est.zero_stage), est.offload, est.peft, "yes" if est.gradient_checkpointing else "no",
                      str(est.batch), format_bytes(est.total), format_bytes(est.cpu_offloaded) if est.cpu_offloaded
                      else "-")
    return table
