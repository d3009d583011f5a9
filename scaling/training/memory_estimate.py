"""Per-GPU memory of training a preset under ZeRO, precision, PEFT and EMA, estimated before any run.

    est = estimate_memory("large", zero_stage=3, gpus=8, offload="cpu", peft="lora", batch=8, image_size=480)
    est.total, est.fits(parse_size("80GB"))
    est = estimate_for_config(load_config("recipes/configs/biomedgpt/large_finetune.yaml"), zero_stage=2, gpus=8)
    fit(parse_size("80GB"), "xlarge", gpus=8)     # every (zero, offload, peft, checkpointing, batch) that fits

Model states are counted the way DeepSpeed (0.19) allocates them, which is also the accounting of its own estimators
(`estimate_zero2_model_states_mem_needs`, `estimate_zero3_model_states_mem_needs`). With Ψ parameters of which T
train, N GPUs and mixed precision, one GPU holds:

    ZeRO-1/2   16-bit weights 2Ψ; 16-bit gradients 2T (ZeRO-2: 2T/N) and, inside the optimizer step, their fp32
               copy 4T/N; fp32 master weights and Adam m, v 12T/N
    ZeRO-3     all of that divided by N, plus the largest layer gathered in 16 bits with its 16-bit gradient
               (4 bytes per parameter of the biggest module, the token embedding); beyond DeepSpeed's estimators,
               the other layers' 16-bit weights that stay gathered from forward to backward (MAX_LIVE_PARAMETERS)
    offload    optimizer states and the fp32 gradient copy live in host memory (ZeRO-3: the 16-bit weights too)
    no ZeRO    DDP or one device under autocast: fp32 weights 4Ψ, fp32 gradients 4T, Adam m, v 8T, and the 16-bit
               weight copies autocast keeps for backward 2Ψ

Frozen parameters keep their weights only; QLoRA stores frozen linears in 4 (or 8) bits; an EMA keeps an fp32 copy
of the trainable weights on every device (4T); ZeRO-1/2 reduce gradients through one bucket of
`REDUCE_BUCKET_ELEMENTS` 16-bit elements (ZeRO-3: hidden² elements). Activations are counted tensor by tensor from
the architecture (see `activation_bytes`).
"""

from __future__ import annotations

import functools
import itertools
import json
import re
from dataclasses import asdict, dataclass

import torch
from torch import nn

from scaling.training.memory import format_bytes

PRECISIONS = ("fp32", "bf16", "fp16")
PEFT_METHODS = ("none", "lora", "dora", "ia3", "prefix", "ptv2", "qlora")
OFFLOAD_TARGETS = ("none", "cpu")
ZERO_STAGES = (0, 1, 2, 3)
DEVICES = ("cuda", "cpu")

USABLE_FRACTION = 0.9
"""Share of a GPU's memory an estimate may fill; the rest goes to the CUDA context and allocator fragmentation,
which the estimate does not model."""

MAX_LIVE_PARAMETERS = 1_000_000_000
"""`stage3_max_live_parameters` and `stage3_max_reuse_distance` of accelerate_configs/deepspeed/zero3*.json: ZeRO-3
keeps a gathered layer's weights until its backward when that comes within this many parameters, up to this many per
GPU, so at the turn from forward to backward every preset up to xlarge is gathered whole."""

REDUCE_BUCKET_ELEMENTS = 500_000_000
"""`reduce_bucket_size` of accelerate_configs/deepspeed/zero1.json and zero2.json (LLaMA-Factory's 5e8): ZeRO-1/2
allocate one 16-bit reduce buffer of this many elements (two with overlap_comm, which those files leave off)."""

QUANTIZED_BYTES = {"nf4": 0.5 + 1 / 64 + 4 / (64 * 256), "int8": 1.0}
"""Bytes per quantised weight. NF4: two per byte, an 8-bit absmax per 64-block, an fp32 scale per 256 absmax (double
quant); int8: one byte (the per-row scales are negligible)."""

BODY_PEAK_FACTOR = 0.75
"""Measured live bytes at the peak over the bytes of the tensors `activation_bytes` counts as saved in the ResNet and
the transformer layers (some share storage, backward frees them stage by stage); from CPU runs of the mini preset
with the tensors created during forward + backward tracked one by one (0.65-0.82 over precisions and checkpointing,
tests/training/test_memory.py)."""

LOGIT_BYTES = {"fp32": 8, "bf16": 12, "fp16": 12}
"""Bytes per logit at the cross-entropy's peak, measured: the logits, their fp32 log-softmax and its gradient (16-bit
logits add an fp32 copy)."""


@dataclass(frozen=True)
class ParameterCount:
    """Parameters of a preset under a PEFT policy (tied weights once)."""

    total: int
    trainable: int
    largest_layer: int = 0
    """Parameters of the biggest single module (its own, not its children's): what ZeRO-3 gathers at once."""
    quantized: int = 0
    """Frozen base weights stored in 4 or 8 bits (QLoRA); counted in `total`."""
    quantized_bytes: float = 0.0
    """Bytes those quantised weights take."""


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
    ema: bool
    device: str
    total_params: int
    trainable_params: int
    parameters: int
    gradients: int
    """16-bit gradients (fp32 without mixed precision) and the fp32 partition the optimizer step creates."""
    optimizer_states: int
    gathered: int
    """ZeRO-3: the largest layer gathered with its gradient; no ZeRO under autocast: the 16-bit weight copies."""
    live_parameters: int
    """ZeRO-3: the other gathered weights kept live between forward and backward (MAX_LIVE_PARAMETERS); beyond
    DeepSpeed's estimators, which count the largest layer only."""
    ema_weights: int
    buffers: int
    """DeepSpeed's gradient reduce bucket."""
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
        """Weights, gradients, optimizer states and gathered layers: the figure DeepSpeed's estimators give."""
        return self.parameters + self.gradients + self.optimizer_states + self.gathered

    @property
    def total(self) -> int:
        return self.model_states + self.live_parameters + self.ema_weights + self.buffers + self.activations

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
    ResNet, which has no attention); qlora is LoRA over NF4 base weights; none trains everything."""
    from scaling.config import PeftArgs

    _check_choice("peft", method, PEFT_METHODS)
    if method == "none":
        return PeftArgs()
    if method == "qlora":
        return PeftArgs(vision="lora", encoder="lora", decoder="lora", quantize="nf4")
    vision = method if method in ("lora", "dora", "ia3") else "freeze"
    return PeftArgs(vision=vision, encoder=method, decoder=method)


def count_parameters(preset: str, peft="none", freeze_embeddings: bool = False) -> ParameterCount:
    """Total, trainable, largest-layer and quantised parameters of a preset under a PEFT method name or PeftArgs
    policy, from the real model built on meta (train.freeze_embeddings freezes the tied token embedding)."""
    args = peft_args_for(peft) if isinstance(peft, str) else peft
    return _count_parameters(preset, json.dumps(asdict(args), sort_keys=True), freeze_embeddings)


@functools.lru_cache(maxsize=64)
def _count_parameters(preset: str, peft_json: str, freeze_embeddings: bool) -> ParameterCount:
    from scaling.config import PeftArgs

    args = PeftArgs(**json.loads(peft_json))
    model = _meta_model(preset)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    if args.enabled:
        from scaling.adapters import apply_peft

        # Quantising needs real weights; on meta, count the linears quantize_frozen_linears would replace.
        model = apply_peft(model, PeftArgs(**{**asdict(args), "quantize": "none"}))
    embeddings = model.get_input_embeddings().weight
    if freeze_embeddings:
        embeddings.requires_grad_(False)
    params = list(model.parameters())  # tied weights once
    quantized = 0
    if args.quantize != "none":
        quantized = sum(m.weight.numel() for m in model.modules()
                        if type(m) is nn.Linear and not m.weight.requires_grad and m.weight is not embeddings)
    return ParameterCount(total=sum(p.numel() for p in params),
                          trainable=sum(p.numel() for p in params if p.requires_grad), largest_layer=largest,
                          quantized=quantized, quantized_bytes=quantized * QUANTIZED_BYTES.get(args.quantize, 0.0))


def model_state_bytes(
    params: ParameterCount, precision: str = "bf16", zero_stage: int = 0, gpus: int = 1, offload: str = "none",
    ema: bool = False,
) -> dict[str, int]:
    """Per-GPU bytes of weights, gradients, optimizer states, gathered and live layers and EMA, and the bytes offloaded
    to the host, as DeepSpeed allocates them at each ZeRO stage (the module docstring has the table)."""
    _check_choice("precision", precision, PRECISIONS)
    _check_choice("zero_stage", zero_stage, ZERO_STAGES)
    _check_choice("offload", offload, OFFLOAD_TARGETS)
    if offload != "none" and zero_stage == 0:
        raise ValueError("offload needs ZeRO stage 1, 2 or 3 (DeepSpeed offloads partitioned optimizer states)")
    if ema and zero_stage == 3:
        raise ValueError("EMA keeps full fp32 weight averages on every rank, which ZeRO-3 shards away: the recipes "
                         "refuse train.ema_decay > 0 under ZeRO-3")
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, got {gpus}")
    mixed = precision != "fp32"
    dense = params.total - params.quantized
    trainable, n = params.trainable, gpus
    if zero_stage == 0:  # accelerate autocast: fp32 weights and gradients, 16-bit copies made for the forward
        states = {"parameters": 4 * dense, "gradients": 4 * trainable, "optimizer_states": 8 * trainable,
                  "gathered": 2 * dense if mixed else 0, "live_parameters": 0}
    else:
        weight_bytes = 2 if mixed else 4
        states = {
            "parameters": weight_bytes * dense / (n if zero_stage == 3 else 1),
            # 16-bit gradients (partitioned from stage 2) + the fp32 copy of this rank's partition inside the step
            "gradients": weight_bytes * trainable / (n if zero_stage >= 2 else 1) + (4 * trainable / n if mixed else 0),
            "optimizer_states": (12 if mixed else 8) * trainable / n,  # fp32 master weights (mixed) + Adam m, v
            "gathered": 2 * weight_bytes * params.largest_layer if zero_stage == 3 else 0,
            # ZeRO-3: the other layers' weights, live from their forward to their backward use
            "live_parameters": weight_bytes * max(min(dense, MAX_LIVE_PARAMETERS) - params.largest_layer, 0)
            if zero_stage == 3 else 0,
        }
    states["parameters"] += params.quantized_bytes / (n if zero_stage == 3 else 1)
    offloaded = 0.0
    if offload == "cpu":
        fp32_gradients = 4 * trainable / n if mixed else 0
        offloaded = states["optimizer_states"] + fp32_gradients
        states["optimizer_states"] = 0
        states["gradients"] -= fp32_gradients
        if zero_stage == 2:  # reduced gradients go straight into the host's fp32 partition
            states["gradients"] = 0
        if zero_stage == 3:  # offload_param: the 16-bit partitions too; gradients leave the GPU as they are reduced
            offloaded += states["parameters"] + states["gradients"]
            states["parameters"] = states["gradients"] = 0
    states["ema_weights"] = 4 * trainable if ema else 0
    return {**{k: int(round(v)) for k, v in states.items()}, "cpu_offloaded": int(round(offloaded))}


def buffer_bytes(zero_stage: int, hidden_size: int, precision: str = "bf16") -> int:
    """DeepSpeed's gradient reduce bucket: REDUCE_BUCKET_ELEMENTS at ZeRO-1/2, hidden² ("auto") at ZeRO-3."""
    if zero_stage == 0:
        return 0
    elements = REDUCE_BUCKET_ELEMENTS if zero_stage < 3 else hidden_size**2
    return elements * (4 if precision == "fp32" else 2)


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
    embeddings, encoder, decoder, head).

    Counted from the tensors autograd saves in `modeling.py` with the model in its compute dtype (DeepSpeed casts the
    module; fp32 otherwise), scaled by the measured `BODY_PEAK_FACTOR`, plus the cross-entropy's peak over the
    logits (`LOGIT_BYTES`). Encoder length S = (image_size / 16)^2 patches + src_len text tokens; decoder length T.
    Attention biases are counted per sample, (B, H, S, S), as text padding makes them (an unpadded batch shares one
    (1, H, S, S) bias, so the estimate is an upper bound there).
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
    parts = {name: int(BODY_PEAK_FACTOR * value) for name, value in parts.items()}
    parts["head"] = LOGIT_BYTES[precision] * B * T * config.vocab_size
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
    peft="none",
    precision: str = "bf16",
    batch: int = 8,
    image_size: int | None = None,
    src_len: int = 128,
    tgt_len: int = 32,
    gradient_checkpointing: bool = False,
    device: str = "cuda",
    ema: bool = False,
    freeze_embeddings: bool = False,
) -> MemoryEstimate:
    """Per-GPU memory of training `preset` with one configuration (batch = micro-batch per GPU; peft = a method name
    or a PeftArgs policy; tgt_len = every decoder token, the prompt included under prompt_type prev_output)."""
    from scaling.models.biomedgpt.configuration import BiomedGPTConfig

    _check_choice("device", device, DEVICES)
    if batch < 1 or src_len < 1 or tgt_len < 1:
        raise ValueError(f"batch, src_len and tgt_len must be >= 1, got {batch}, {src_len}, {tgt_len}")
    config = BiomedGPTConfig.from_preset(preset, **({"image_size": image_size} if image_size else {}))
    params = count_parameters(preset, peft, freeze_embeddings)
    states = model_state_bytes(params, precision, zero_stage, gpus, offload, ema)
    shape = (config, batch, config.image_size, src_len, tgt_len, precision)
    return MemoryEstimate(
        preset=preset, zero_stage=zero_stage, gpus=gpus, offload=offload, peft=_peft_label(peft),
        precision=precision, batch=batch, image_size=config.image_size, src_len=src_len, tgt_len=tgt_len,
        gradient_checkpointing=gradient_checkpointing, ema=ema, device=device,
        total_params=params.total, trainable_params=params.trainable,
        parameters=states["parameters"], gradients=states["gradients"], optimizer_states=states["optimizer_states"],
        gathered=states["gathered"], live_parameters=states["live_parameters"],
        ema_weights=states["ema_weights"],
        buffers=buffer_bytes(zero_stage, config.d_model, precision),
        activations_full=activation_bytes(*shape, gradient_checkpointing=False, device=device)["total"],
        activations_checkpointed=activation_bytes(*shape, gradient_checkpointing=True, device=device)["total"],
        cpu_offloaded=states["cpu_offloaded"],
    )


def estimate_for_config(cfg, zero_stage: int, gpus: int, offload: str = "none", device: str = "cuda",
                        batch: int | None = None) -> MemoryEstimate:
    """The estimate of a recipe config (preset, image size, lengths, micro-batch, precision, checkpointing, PEFT,
    EMA, frozen embeddings) launched under a ZeRO stage on `gpus` devices."""
    data, train = cfg.data, cfg.train
    decoder_tokens = data.max_tgt_len + (data.max_src_len if data.prompt_type == "prev_output" else 0)
    return estimate_memory(
        cfg.model.preset, zero_stage, gpus, offload, cfg.peft if cfg.peft.enabled else "none",
        "fp32" if train.mixed_precision == "no" else train.mixed_precision, batch or train.batch_size,
        cfg.model.image_size, data.max_src_len, decoder_tokens, train.gradient_checkpointing, device,
        ema=train.ema_decay > 0, freeze_embeddings=train.freeze_embeddings)


def _peft_label(peft) -> str:
    """A method name as given, or a PeftArgs policy as vision-encoder-decoder (+ quantisation)."""
    if isinstance(peft, str):
        return peft
    label = f"{peft.vision}-{peft.encoder}-{peft.decoder}"
    return label + (f"+{peft.quantize}" if peft.quantize != "none" else "")


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
    ema: bool = False,
    freeze_embeddings: bool = False,
) -> list[MemoryEstimate]:
    """Every (ZeRO stage, offload, PEFT, gradient checkpointing, batch) that fits, cheapest memory first per batch.

    Only the largest fitting batch of each (stage, offload, peft, checkpointing) combination is listed; with `ema`,
    ZeRO-3 (which the recipes refuse with EMA) is left out.
    """
    limit = parse_size(gpu_memory)
    found = []
    combos = itertools.product(ZERO_STAGES, OFFLOAD_TARGETS, peft_methods, (False, True))
    for stage, offload, peft, checkpointing in combos:
        if (offload != "none" and stage == 0) or (ema and stage == 3):
            continue
        fitting = [
            est for batch in batches
            if (est := estimate_memory(preset, stage, gpus, offload, peft, precision, batch, image_size, src_len,
                                       tgt_len, checkpointing, ema=ema,
                                       freeze_embeddings=freeze_embeddings)).fits(limit)
        ]
        if fitting:
            found.append(fitting[-1])
    return sorted(found, key=lambda e: (-e.batch, e.total))


# ---------------------------------------------------------------------------------------------------------------------
# Tables


def estimate_table(est: MemoryEstimate, gpu_memory: int | None = None):
    """A rich table of one estimate: per-GPU bytes per part, host bytes, and the verdict for `gpu_memory`."""
    from rich.table import Table

    title = (f"{est.preset} · ZeRO-{est.zero_stage} × {est.gpus} {est.device.upper()} · offload {est.offload} · "
             f"peft {est.peft} · {est.precision} · batch {est.batch} · {est.image_size}px · src {est.src_len} · "
             f"tgt {est.tgt_len}{' · EMA' if est.ema else ''}")
    table = Table(title=title, title_justify="left")
    table.add_column("per GPU")
    table.add_column("bytes", justify="right")
    table.add_column("note")
    trainable = f"{est.trainable_params:,} of {est.total_params:,} parameters trainable"
    rows = [
        ("parameters", est.parameters, f"{est.total_params:,} parameters"),
        ("gradients", est.gradients, trainable + "; the step's fp32 copy included"),
        ("optimizer states", est.optimizer_states, "fp32 master weights + Adam m, v"),
        ("gathered weights", est.gathered, "ZeRO-3: largest layer + its gradient; no ZeRO: autocast's 16-bit copies"),
        ("live weights", est.live_parameters, "ZeRO-3: the rest of the gathered model, kept for its backward"),
        ("EMA weights", est.ema_weights, "fp32 average of the trainable weights"),
        ("reduce bucket", est.buffers, "DeepSpeed's gradient bucket"),
    ]
    for name, value, note in rows:
        if value or name in ("parameters", "gradients", "optimizer states"):
            table.add_row(name, format_bytes(value), note)
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
