"""Per-component PEFT, MILE's ViT / JTM / Dec policy, on top of the peft library (+ bitsandbytes QLoRA).

    model = apply_peft(model, cfg.peft)            # freeze | full | lora | dora | ia3 | prefix | ptv2 per component
    print_trainable(count_trainable(model))       # trainable params and % of all params (adapters included)
    save_adapter(model, run_dir / "adapter")       # only the trainable tensors; gathers them under ZeRO-3
    model = load_adapter(base_model, run_dir / "adapter")
    model = merge_adapters(model)                  # LoRA/DoRA/IA3 folded into the weights, plain model again

Components are found by parameter/module name: vision = `encoder.embed_images.*` + `encoder.image_proj.*`, encoder =
the rest of `encoder.*`, decoder = `decoder.*` (an optional leading `model.` is allowed). LoRA/DoRA/IA3 are injected
with `peft.inject_adapter_in_model`, the model keeps its class; one adapter per method ("lora", "dora", "ia3") whose
target is a regex that only matches modules of its components, so a vision LoRA never reaches encoder layers.
Prefix tuning and P-tuning v2 use peft's `PrefixEncoder` for the parameters (MILE: PrefixTuningConfig with and without
`prefix_projection`) and feed the model's `prefix_key_values` through forward pre-hooks on the encoder/decoder, so
`generate()` sees them too. peft itself cannot express a prefix on only one side of a custom encoder-decoder.
MILE's z = [PREFIX; x] is realised as in its code (and Li & Liang): P virtual key/value vectors prepended in every
self-attention layer of the component, produced by an MLP from P embeddings (prefix) or read from a trainable
P x (layers * 2 * d) matrix (ptv2); they carry no position bias and do not shift the real tokens' positions. (MILE's
BLIP decoder did shift them: HF BERT starts the position ids after the cached length, so its real tokens were
embedded at positions P..P+n. OFA has no absolute position embedding in the hidden states, only position biases
on the attention logits, so there is nothing to shift; the rows of the PEFT sweep differ from MILE's there.)

Policies in detail:
- freeze / full set requires_grad. A ResNet that is not fully trained normalises with its BatchNorm statistics.
- The Dec column is honoured: OFA ties the decoder's token embedding and output projection to the encoder's token
  embedding. When exactly one of encoder and decoder is `full`, the decoder gets its own copy for the run (still
  tied to its output projection, as MISS's decoder is), so it follows the decoder's policy and the encoder's copy the
  encoder's; #Params counts both copies. The copy is part of the policy: save_adapter keeps the trained one,
  load_adapter unties the base model again before loading, and merge_adapters refuses (a BiomedGPT checkpoint holds
  one shared embedding). With equal policies the embedding stays shared and trains when both are full.
- QLoRA (quantize nf4/int8) replaces the nn.Linear of every non-full component by a frozen bitsandbytes layer before
  the adapters are injected (peft then uses its bnb-aware LoRA/IA3 layers). Adapters are float32 without DeepSpeed
  (autocast computes in 16 bits); under DeepSpeed bf16/fp16 they are 16-bit like every parameter, and DeepSpeed's
  optimizer keeps their fp32 master copy.
- save_adapter writes the trainable tensors only (+ BatchNorm statistics of a fully trained ResNet): under ZeRO-3
  every rank calls it and the trainable parameters are gathered first. load_adapter re-applies the saved policy
  to a base model and loads them; merge_adapters folds LoRA/DoRA/IA3 into the weights (not prefixes, not quantised).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from peft import IA3Config, LoraConfig, PrefixTuningConfig, inject_adapter_in_model
from peft.tuners.prefix_tuning import PrefixEncoder
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from scaling.config import ConfigError, PeftArgs

COMPONENTS = ("vision", "encoder", "decoder")

# Full-match patterns of the module/parameter names of each component.
COMPONENT_PATTERNS = {
    "vision": r"(?:model\.)?encoder\.(?:embed_images|image_proj)(?:\..+)?",
    "encoder": r"(?:model\.)?encoder\.(?!(?:embed_images|image_proj)(?:\.|$)).+",
    "decoder": r"(?:model\.)?decoder\..+",
}
PREFIX_MODULE = "peft_prefix"  # attribute of the model holding the prefix encoders (saved with the adapter)
ADAPTER_NAME_MARKERS = (".lora_", ".ia3_")  # peft's parameter-name prefixes of LoRA/DoRA and IA3 layers
ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
INJECTED = ("lora", "dora", "ia3")  # methods injected through peft tuner layers (mergeable)
PREFIXES = ("prefix", "ptv2")


def component_of(name: str) -> str | None:
    """Which component a parameter or module name belongs to (None: shared top-level pieces)."""
    for component, pattern in COMPONENT_PATTERNS.items():
        if re.fullmatch(pattern, name):
            return component
    return None


def target_regex(components: list[str], suffixes: dict[str, list[str]]) -> str:
    """A peft target regex: module names inside one of `components` ending in one of that component's suffixes."""
    alternatives = []
    for component in components:
        tails = "|".join(re.escape(s) for s in suffixes[component])
        # The look-ahead pins the whole name to the component; the rest requires a `.suffix` ending.
        alternatives.append(rf"(?=(?:{COMPONENT_PATTERNS[component]})$)(?:.*\.)?(?:{tails})")
    return "|".join(f"(?:{a})" for a in alternatives)


def method_targets(args: PeftArgs, method: str) -> dict[str, list[str]]:
    """Module-name suffixes each component adapts with `method` (vision IA3 reuses the vision targets)."""
    if method == "ia3":
        return {"vision": args.vision_modules, "encoder": args.ia3_modules, "decoder": args.ia3_modules}
    return {"vision": args.vision_modules, "encoder": args.encoder_modules, "decoder": args.decoder_modules}


def components_with(args: PeftArgs, *methods: str) -> list[str]:
    return [c for c in COMPONENTS if getattr(args, c) in methods]


# ---------------------------------------------------------------------------------------------------------------------
# Validation before any work


def peft_problems(model: nn.Module, args: PeftArgs) -> list[str]:
    """Every reason `args` cannot be applied to `model` (config-only checks live in PeftArgs.problems)."""
    out = list(args.problems())
    if getattr(model, "peft_args", None) is not None:
        out.append("the model already carries adapters; apply_peft runs once on a base model")
    modules = dict(model.named_modules())
    for component in components_with(args, *INJECTED):
        method = getattr(args, component)
        suffixes = method_targets(args, method)[component]
        pattern = target_regex([component], {component: suffixes})
        hits = [n for n, m in modules.items() if re.fullmatch(pattern, n) and isinstance(m, (nn.Linear, nn.Conv2d))]
        if not hits:
            leaves = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if component_of(n) == component
                             and isinstance(m, (nn.Linear, nn.Conv2d))})
            field = "ia3_modules" if method == "ia3" and component != "vision" else f"{component}_modules"
            out.append(f"peft.{component}={method}: no Linear/Conv2d of the {component} matches peft.{field} "
                       f"{suffixes}; its adaptable modules end in {leaves or 'nothing'}")
    for component in components_with(args, *PREFIXES):
        side = _side_module(model, component)
        if side is None or "prefix_key_values" not in inspect.signature(side.forward).parameters:
            out.append(f"peft.{component}={getattr(args, component)}: the model's {component} does not accept "
                       "prefix_key_values, so prefix tuning cannot reach its attention")
    if args.quantize != "none":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            out.append(f"peft.quantize={args.quantize} needs bitsandbytes >= 0.50 (pip install bitsandbytes)")
    return out


def _side_module(model: nn.Module, component: str) -> nn.Module | None:
    """The encoder or decoder submodule of a BiomedGPT model."""
    getter = getattr(model, f"get_{component}", None)
    return getter() if callable(getter) else None


# ---------------------------------------------------------------------------------------------------------------------
# Applying the policy


def apply_peft(model: nn.Module, args: PeftArgs) -> nn.Module:
    """Apply the per-component policy in place and return the model; raise ConfigError listing every problem."""
    problems = peft_problems(model, args)
    if problems:
        raise ConfigError(problems, "peft")
    if (args.encoder == "full") != (args.decoder == "full"):
        untie_decoder_embeddings(model)
    if args.quantize != "none":
        quantize_frozen_linears(model, args)
    for method in INJECTED:
        components = components_with(args, method)
        if components:
            with warnings.catch_warnings():  # several methods in one model are intended: one adapter name each
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                inject_adapter_in_model(peft_config(args, method, components), model, adapter_name=method)
    hooks = []
    for component in components_with(args, *PREFIXES):
        hooks.append(attach_prefix(model, args, component))
    if args.vision != "full":
        hooks += freeze_batch_norm(model)
    activate_all_adapters(model)
    set_trainable(model, args)
    model.train(model.training)  # new dropout modules start in training mode even inside an eval() model
    model.peft_args = args
    model.peft_hooks = hooks
    return model


def peft_config(args: PeftArgs, method: str, components: list[str]) -> LoraConfig | IA3Config:
    """The peft config of one method over its components (one regex, so components never leak into each other)."""
    targets = target_regex(components, method_targets(args, method))
    if method == "ia3":
        feedforward = {c: args.ia3_feedforward_modules if c != "vision" else [] for c in components}
        ff_components = [c for c in components if feedforward[c]]
        # peft requires feedforward ⊆ targets; an impossible pattern stands for "none".
        ff_regex = target_regex(ff_components, feedforward) if ff_components else r"(?!)"
        return IA3Config(target_modules=targets, feedforward_modules=ff_regex)
    return LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=targets,
                      use_dora=method == "dora")


def untie_decoder_embeddings(model: nn.Module) -> None:
    """Give the decoder its own copy of the shared token embedding, tied to its output projection (sync-free: every
    rank copies the same weights)."""
    decoder = _side_module(model, "decoder")
    shared = decoder.embed_tokens
    with gathered([shared.weight]):
        weight = shared.weight.detach().clone()
    copy = nn.Embedding(shared.num_embeddings, shared.embedding_dim, padding_idx=shared.padding_idx,
                        device=weight.device, dtype=weight.dtype)
    copy.weight = nn.Parameter(weight, requires_grad=shared.weight.requires_grad)
    decoder.embed_tokens = copy
    # The model's config keeps tie_word_embeddings (it may be shared with other models): transformers' tie_weights()
    # would share the embedding again, and nothing after apply_peft calls it.
    model.get_output_embeddings().weight = copy.weight


def embeddings_untied(model: nn.Module) -> bool:
    """Whether the decoder has its own token embedding (untie_decoder_embeddings ran on this model)."""
    return model.get_input_embeddings().weight is not model.get_output_embeddings().weight


def activate_all_adapters(model: nn.Module) -> None:
    """Make each tuner layer run every adapter it holds (peft activates only the last injected name)."""
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            names = [n for attr in module.adapter_layer_names for n in getattr(module, attr).keys()]
            module.set_adapter(sorted(set(names)))


def set_trainable(model: nn.Module, args: PeftArgs) -> None:
    """requires_grad = the parameter is an adapter or belongs to a `full` component (tied weights: any of its names)."""
    full = {c for c in COMPONENTS if getattr(args, c) == "full"}
    trainable: dict[int, bool] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owner = component_of(_base_name(name))
        if is_adapter_name(name):
            wanted = True
        elif owner is None:  # shared top-level pieces train with the decoder, which owns the output head
            wanted = "decoder" in full
        else:
            wanted = owner in full and not _is_quantized(param)
        trainable[id(param)] = trainable.get(id(param), False) or wanted
    for param in model.parameters():
        param.requires_grad_(trainable[id(param)])


def is_adapter_name(name: str) -> bool:
    """A parameter added by apply_peft (LoRA/DoRA/IA3 weights or a prefix encoder)."""
    return name.startswith(f"{PREFIX_MODULE}.") or any(m in name for m in ADAPTER_NAME_MARKERS)


def _base_name(name: str) -> str:
    """The parameter name without peft's `.base_layer` wrapping."""
    return name.replace(".base_layer", "")


def freeze_batch_norm(model: nn.Module) -> list:
    """A frozen or adapted ResNet normalises with its running statistics, so its buffers never change."""

    def use_running_stats(module: nn.Module, _inputs) -> None:
        module.training = False

    return [m.register_forward_pre_hook(use_running_stats) for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and component_of(n) == "vision"]


# ---------------------------------------------------------------------------------------------------------------------
# Prefix tuning / P-tuning v2


def attach_prefix(model: nn.Module, args: PeftArgs, component: str):
    """Add a PrefixEncoder for `component` under model.peft_prefix and feed it as that side's prefix_key_values."""
    config = model.config
    layers = config.encoder_layers if component == "encoder" else config.decoder_layers
    heads = config.encoder_attention_heads if component == "encoder" else config.decoder_attention_heads
    prefix_config = PrefixTuningConfig(
        num_virtual_tokens=args.num_virtual_tokens,
        token_dim=config.d_model,
        num_layers=layers,
        num_attention_heads=heads,
        encoder_hidden_size=args.prefix_hidden_size or config.d_model,
        prefix_projection=getattr(args, component) == "prefix" and args.prefix_projection,
    )
    if not hasattr(model, PREFIX_MODULE):
        setattr(model, PREFIX_MODULE, nn.ModuleDict())
    encoder = PrefixEncoder(prefix_config).to(next(model.parameters()).device)
    getattr(model, PREFIX_MODULE)[component] = encoder
    side = _side_module(model, component)
    signature = inspect.signature(side.forward)

    def inject(_module, inputs, kwargs):
        bound = signature.bind_partial(*inputs, **kwargs)
        given = dict(bound.arguments.get("prefix_key_values") or {})
        if component not in given:
            given[component] = prefix_key_values(encoder, layers, heads, args.num_virtual_tokens)
            bound.arguments["prefix_key_values"] = given
        return bound.args, bound.kwargs

    return side.register_forward_pre_hook(inject, with_kwargs=True)


def prefix_key_values(encoder: PrefixEncoder, layers: int, heads: int, tokens: int) -> list[tuple]:
    """Per layer a (key, value) pair of shape (1, heads, P, head_dim); the model broadcasts it over the batch."""
    index = torch.arange(tokens, device=encoder.embedding.weight.device).unsqueeze(0)  # (1, P)
    flat = encoder(index)  # (1, P, layers * 2 * d)
    per_head = flat.view(1, tokens, layers * 2, heads, -1).permute(2, 0, 3, 1, 4)  # (layers * 2, 1, H, P, hd)
    return [(per_head[2 * i], per_head[2 * i + 1]) for i in range(layers)]


# ---------------------------------------------------------------------------------------------------------------------
# QLoRA: bitsandbytes base layers


def quantize_frozen_linears(model: nn.Module, args: PeftArgs) -> None:
    """Replace the nn.Linear of every non-full component by a frozen bitsandbytes 4-bit NF4 or 8-bit layer.

    Convolutions stay in floating point (bitsandbytes has no quantised Conv2d); weights tied elsewhere (the output
    projection shares the token embedding) are left alone. peft then wraps these layers with its bnb-aware LoRA/IA3.
    """
    owners: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        owners[id(param)] = owners.get(id(param), 0) + 1
    targets = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear and component_of(n) in COMPONENTS
               and getattr(args, component_of(n)) != "full" and owners[id(m.weight)] == 1]
    for name, linear in targets:
        parent, child = _parent(model, name)
        setattr(parent, child, quantized_linear(linear, args))
    # peft's dispatchers pick their bitsandbytes layer classes (correct dtype handling, merge) from these flags.
    model.is_loaded_in_4bit = args.quantize == "nf4"
    model.is_loaded_in_8bit = args.quantize == "int8"


def quantized_linear(linear: nn.Linear, args: PeftArgs) -> nn.Module:
    """A bitsandbytes copy of `linear`; the weight is quantised when moved to its device."""
    import bitsandbytes as bnb

    bias = linear.bias is not None
    weight = linear.weight.data
    if args.quantize == "nf4":
        dtype = getattr(torch, args.quant_compute_dtype)
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=dtype,
                                  compress_statistics=args.double_quant, quant_type="nf4", device="meta")
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=args.double_quant,
                                         quant_type="nf4")
    else:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False,
                                    device="meta")
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    if bias:
        layer.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    return layer.to(weight.device)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, child = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), child


def _is_quantized(param: torch.Tensor) -> bool:
    return param.dtype in (torch.uint8, torch.int8)


# ---------------------------------------------------------------------------------------------------------------------
# Accounting


def count_trainable(model: nn.Module) -> dict[str, dict[str, float]]:
    """Per component (vision/encoder/decoder/shared/adapters) and overall: trainable and total parameters, and the
    trainable share of ALL parameters, adapters included (MILE's #Params %). Tied weights count once; 4-bit weights
    count their logical (unpacked) size; ZeRO-3 shards count their full size."""
    rows = {c: {"trainable": 0, "total": 0} for c in (*COMPONENTS, "shared", "adapters")}
    for name, param in model.named_parameters():
        row = "adapters" if is_adapter_name(name) else (component_of(_base_name(name)) or "shared")
        size = _logical_numel(param)
        rows[row]["total"] += size
        rows[row]["trainable"] += size if param.requires_grad else 0
    if not rows["shared"]["total"]:
        del rows["shared"]
    total = sum(r["total"] for r in rows.values())
    rows["all"] = {"trainable": sum(r["trainable"] for r in rows.values()), "total": total}
    for row in rows.values():
        row["trainable_pct"] = 100.0 * row["trainable"] / max(total, 1)
    return rows


def _logical_numel(param: torch.Tensor) -> int:
    quant_state = getattr(param, "quant_state", None)
    if quant_state is not None:  # Params4bit stores two 4-bit values per uint8
        return int(torch.Size(quant_state.shape).numel())
    return int(getattr(param, "ds_numel", param.numel()))


def trainable_table(counts: dict[str, dict[str, float]], title: str = "Trainable parameters"):
    """A rich table of count_trainable's result."""
    from rich.table import Table

    table = Table(title=title)
    for column in ("component", "trainable", "total", "% of all params"):
        table.add_column(column, justify="left" if column == "component" else "right")
    for name, row in counts.items():
        table.add_row(name, f"{row['trainable']:,}", f"{row['total']:,}", f"{row['trainable_pct']:.3f}")
    return table


def print_trainable(counts: dict[str, dict[str, float]], title: str = "Trainable parameters") -> None:
    """Print the accounting table on the main process."""
    from scaling.logging import console, is_main_process

    if is_main_process():
        console.print(trainable_table(counts, title))


# ---------------------------------------------------------------------------------------------------------------------
# Save / load / merge


def save_adapter(model: nn.Module, out_dir: str | Path, is_main_process: bool = True) -> Path | None:
    """Write the trainable tensors (adapters + fully trained components) and the policy to `out_dir`.

    Under ZeRO-3 every rank must call this: the trainable parameters (only those) are gathered first, since the
    local shards are empty (peft#2892). Only the main process writes. Returns the weights file on the main process.
    """
    from safetensors.torch import save_file

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("nothing to save: the model has no trainable parameters (all components frozen?)")
    named += trained_buffers(model)
    with gathered([p for _, p in named]):
        state = {n: p.detach().to("cpu", copy=True).contiguous() for n, p in named} if is_main_process else {}
    if not is_main_process:
        return None
    empty = [n for n, t in state.items() if t.numel() == 0]
    if empty:
        raise RuntimeError(f"refusing to save empty adapter tensors {empty[:3]}...: ZeRO-3 shards were not gathered")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    args = getattr(model, "peft_args", None) or PeftArgs()
    meta = {"peft": dataclasses.asdict(args), "tensors": len(state), "parameters": sum(t.numel() for t in state.values())}
    _atomic_write(out / CONFIG_FILE, lambda p: p.write_text(json.dumps(meta, indent=2)))
    _atomic_write(out / ADAPTER_FILE, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    return out / ADAPTER_FILE


def load_adapter(base: nn.Module, adapter_dir: str | Path, **peft_overrides: Any) -> nn.Module:
    """Apply the saved policy to a base model and load the saved tensors (e.g. quantize="none" to merge later)."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    config_path, weights_path = adapter_dir / CONFIG_FILE, adapter_dir / ADAPTER_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; point at a directory written by save_adapter")
    saved = json.loads(config_path.read_text())["peft"]
    args = PeftArgs(**{**saved, **peft_overrides})
    model = apply_peft(base, args)
    state = load_file(str(weights_path))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad} | dict(trained_buffers(model))
    missing, unexpected = sorted(params.keys() - state.keys()), sorted(state.keys() - params.keys())
    if missing or unexpected:
        raise ValueError(f"{weights_path} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}; "
                         "load it onto the same base model (preset/checkpoint) it was trained from")
    with torch.no_grad():
        for name, tensor in state.items():
            if params[name].shape != tensor.shape:
                raise ValueError(f"{weights_path}: {name} has shape {tuple(tensor.shape)}, the model expects "
                                 f"{tuple(params[name].shape)} (different preset or rank?)")
            params[name].copy_(tensor)
    return model


def trained_buffers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """BatchNorm running statistics of a fully trained vision component: training moves them, so they are saved."""
    args = getattr(model, "peft_args", None) or PeftArgs()
    if args.vision != "full":
        return []
    return [(n, b) for n, b in model.named_buffers() if component_of(n) == "vision" and b.is_floating_point()]


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold LoRA/DoRA/IA3 into the base weights and remove the tuner layers: a plain model for save_pretrained."""
    args = getattr(model, "peft_args", None)
    if args is None:
        return model
    if components_with(args, *PREFIXES):
        raise ValueError(f"prefix adapters ({', '.join(components_with(args, *PREFIXES))}) cannot be merged into "
                         "weights; export the adapter with save_adapter instead")
    if args.quantize != "none":
        raise ValueError("merging into bitsandbytes-quantised weights loses precision; reload the adapter on the "
                         "unquantised base with load_adapter(base, dir, quantize='none') and merge that")
    if embeddings_untied(model):
        raise ValueError(f"the decoder's token embedding was untied from the encoder's (encoder={args.encoder}, "
                         f"decoder={args.decoder}), and a BiomedGPT checkpoint holds one shared embedding; keep the "
                         "adapter and load it with load_adapter(base, dir)")
    tuner_layers = [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    with torch.no_grad():
        for name, layer in tuner_layers:
            layer.merge(adapter_names=layer.active_adapters)
            parent, child = _parent(model, name)
            setattr(parent, child, layer.get_base_layer())
    for handle in model.peft_hooks:
        handle.remove()
    for attr in ("peft_args", "peft_hooks", "peft_config"):
        if hasattr(model, attr):
            delattr(model, attr)
    for param in model.parameters():
        param.requires_grad_(True)
    return model


@contextlib.contextmanager
def gathered(params: list[torch.Tensor]):
    """Gather ZeRO-3 partitioned parameters (read-only) for the duration; a no-op otherwise."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
    else:
        yield


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    tmp.replace(path)
