"""Per-component PEFT: trainable sets and counts, optimizer steps, save/load, merge, QLoRA, refusals."""

import re

import pytest
import torch
from torch import nn

from scaling.adapters import (
    COMPONENTS,
    apply_peft,
    component_of,
    count_trainable,
    load_adapter,
    merge_adapters,
    save_adapter,
    trainable_table,
)
from scaling.config import Config, ConfigError, PeftArgs, Runtime
from scaling.models.biomedgpt.configuration import BiomedGPTConfig
from scaling.models.biomedgpt.modeling import BiomedGPTForConditionalGeneration

CONFIG = BiomedGPTConfig.from_preset("test")
ALONE = [("vision", m) for m in ("full", "lora", "dora", "ia3")] + [
    (c, m) for c in ("encoder", "decoder") for m in ("full", "lora", "dora", "ia3", "prefix", "ptv2")
]


def build_model() -> BiomedGPTForConditionalGeneration:
    torch.manual_seed(0)
    return BiomedGPTForConditionalGeneration(CONFIG)


def make_batch(seed: int = 1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return dict(
        input_ids=torch.randint(4, CONFIG.vocab_size, (2, 7), generator=gen),
        pixel_values=torch.randn(2, 3, CONFIG.image_size, CONFIG.image_size, generator=gen),
        patch_masks=torch.tensor([True, True]),
        labels=torch.randint(4, CONFIG.vocab_size, (2, 5), generator=gen),
    )


def alone(component: str, method: str, **extra) -> PeftArgs:
    """`method` on one component, every other component frozen."""
    policy = {c: "freeze" for c in COMPONENTS}
    policy[component] = method
    return PeftArgs(**policy, r=4, **extra)


def suffix_matches(name: str, suffixes: list[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


def expected_trainable(base: nn.Module, component: str, method: str, args: PeftArgs) -> tuple[set[str], int]:
    """Names (as in the adapted model) and count of the intended trainable parameters, computed from the base."""
    modules = {n: m for n, m in base.named_modules() if component_of(n) == component}
    if method == "full":  # the shared token embedding trains with its owner
        owned = {id(p) for n, p in base.named_parameters(remove_duplicate=False) if component_of(n) == component}
        names = {n for n, p in base.named_parameters() if id(p) in owned}
        count = sum(p.numel() for n, p in base.named_parameters() if n in names)
        if component == "decoder":  # alone, unlike the frozen encoder: the decoder trains its own copy of it
            names = names - {"model.encoder.embed_tokens.weight"} | {"model.decoder.embed_tokens.weight"}
        return names, count
    if method in ("prefix", "ptv2"):
        layers, d, tokens = getattr(CONFIG, f"{component}_layers"), CONFIG.d_model, args.num_virtual_tokens
        if method == "prefix":
            names = {f"peft_prefix.{component}.{p}" for p in
                     ("embedding.weight", "transform.0.weight", "transform.0.bias", "transform.2.weight",
                      "transform.2.bias")}
            return names, tokens * d + d * d + d + d * layers * 2 * d + layers * 2 * d
        return {f"peft_prefix.{component}.embedding.weight"}, tokens * layers * 2 * d
    targets = args.ia3_modules if method == "ia3" and component != "vision" else getattr(args, f"{component}_modules")
    feedforward = args.ia3_feedforward_modules if component != "vision" else []
    names, count = set(), 0
    for name, module in modules.items():
        if not isinstance(module, (nn.Linear, nn.Conv2d)) or not suffix_matches(name, targets):
            continue
        fan_in = module.weight[0].numel()  # in_features, or in_channels * kh * kw
        out = module.weight.shape[0]
        if method == "ia3":
            names.add(f"{name}.ia3_l.ia3")
            count += module.weight.shape[1] if suffix_matches(name, feedforward) else out
            continue
        names |= {f"{name}.lora_A.{method}.weight", f"{name}.lora_B.{method}.weight"}
        count += args.r * fan_in + out * args.r
        if method == "dora":
            names.add(f"{name}.lora_magnitude_vector.{method}.weight")
            count += out
    return names, count


def train_steps(model: nn.Module, steps: int = 2) -> set[str]:
    """A few Adam steps (the first LoRA step only moves B, which starts at zero); returns who got gradients."""
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        optimizer.zero_grad()
        model(**make_batch(step)).loss.backward()
        optimizer.step()
    model.eval()
    return {n for n, p in model.named_parameters() if p.grad is not None}


def snapshot(tensors) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in tensors if t.is_floating_point()}


@pytest.mark.parametrize(("component", "method"), ALONE)
def test_method_on_one_component_trains_exactly_its_parameters(component, method, tmp_path):
    args = alone(component, method)
    names, count = expected_trainable(build_model(), component, method, args)
    model = apply_peft(build_model(), args)

    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(trainable) == names, sorted(set(trainable) ^ names)[:6]
    assert sum(p.numel() for p in trainable.values()) == count
    counts = count_trainable(model)
    assert counts["all"]["trainable"] == count
    if method != "full":
        assert counts["adapters"]["trainable"] == counts["adapters"]["total"] == count

    before, buffers = snapshot(model.named_parameters()), snapshot(model.named_buffers())
    with_grad = train_steps(model)
    after = snapshot(model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed <= with_grad <= set(trainable), sorted(changed ^ with_grad)[:6]
    if method != "full":  # (a full decoder has tables only image-code generation uses)
        assert changed == set(trainable), sorted(changed ^ set(trainable))[:6]
    if (component, method) != ("vision", "full"):  # a frozen/adapted ResNet keeps its BatchNorm statistics
        assert all(torch.equal(t, buffers[n]) for n, t in snapshot(model.named_buffers()).items())

    batch = make_batch(7)
    with torch.no_grad():
        reference = model(**batch).logits
    save_adapter(model, tmp_path / "adapter")
    reloaded = load_adapter(build_model().eval(), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, reference, rtol=0, atol=1e-6)


@pytest.mark.parametrize("policy", [("lora", "ia3", "dora"), ("ia3", "lora", "lora"), ("full", "dora", "ia3")])
def test_mixed_methods_merge_into_a_plain_model_with_the_same_outputs(policy):
    args = PeftArgs(**dict(zip(COMPONENTS, policy, strict=True)), r=4)
    model = apply_peft(build_model(), args)
    assert count_trainable(model)["adapters"]["trainable"] > 0
    train_steps(model)
    batch = make_batch(3)
    with torch.no_grad():
        reference = model(**batch).logits
        merged = merge_adapters(model)
        assert not any(re.search(r"lora_|ia3_|base_layer", n) for n, _ in merged.named_parameters())
        assert type(merged.model.decoder.layers[0].self_attn.q_proj) is nn.Linear
        torch.testing.assert_close(merged(**batch).logits, reference, rtol=1e-4, atol=1e-5)


def test_vision_lora_stays_in_the_vision_component():
    model = apply_peft(build_model(), alone("vision", "lora"))
    adapted = {n.rsplit(".lora_", 1)[0] for n, _ in model.named_parameters() if ".lora_" in n}
    assert adapted and all(component_of(n) == "vision" for n in adapted)
    assert any(".conv" in n for n in adapted) and "model.encoder.image_proj" in adapted


def test_prefix_reaches_generation_and_changes_outputs():
    base, model = build_model().eval(), apply_peft(build_model(), alone("decoder", "ptv2")).eval()
    batch = make_batch(2)
    inputs = {k: batch[k] for k in ("input_ids", "pixel_values", "patch_masks")}
    with torch.no_grad():
        assert not torch.allclose(model(**batch).logits, base(**batch).logits)
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 2


def test_qlora_nf4_forward_backward_gives_gradients_to_adapters_only():
    import bitsandbytes as bnb

    args = PeftArgs(vision="freeze", encoder="lora", decoder="lora", quantize="nf4", r=4)
    model = apply_peft(build_model(), args)
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and all(not p.requires_grad for m in quantized for p in m.parameters())
    loss = model(**make_batch()).loss
    loss.backward()
    assert torch.isfinite(loss)
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(".lora_" in n for n in with_grad)
    assert with_grad == {n for n, p in model.named_parameters() if p.requires_grad}
    # 4-bit weights count at their logical size: totals match the unquantised model plus the adapters.
    counts = count_trainable(model)
    base_total = sum(p.numel() for p in build_model().parameters())
    assert counts["all"]["total"] == base_total + counts["adapters"]["total"]
    with pytest.raises(ValueError, match="quantize='none'"):
        merge_adapters(model)


def test_trainable_percentage_uses_all_parameters_including_adapters():
    model = apply_peft(build_model(), PeftArgs(vision="full", encoder="lora", decoder="ia3", r=4))
    counts = count_trainable(model)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counts["all"]["total"] == total
    assert counts["all"]["trainable_pct"] == pytest.approx(100 * trainable / total)
    assert counts["vision"]["trainable"] == counts["vision"]["total"]
    assert "% of all params" in [c.header for c in trainable_table(counts).columns]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["peft.vision=prefix"], "prefix methods apply to attention layers"),
        (["peft.quantize=nf4"], "QLoRA + full is refused"),
        (["peft.decoder=prefix", "train.gradient_checkpointing=true"], "gradient_checkpointing"),
        (["peft.quantize=int8", "peft.vision=freeze", "peft.encoder=freeze", "peft.decoder=dora"], "DoRA"),
        (["peft.ia3_feedforward_modules=[fc1]"], "subset"),
    ],
)
def test_invalid_combinations_are_refused_with_the_reason(overrides, message):
    from scaling.config import load_config

    problems = load_config(None, overrides).problems()
    assert any(message in p for p in problems), problems


def test_qlora_with_zero3_is_refused_before_work():
    cfg = Config(peft=PeftArgs(vision="freeze", encoder="lora", decoder="lora", quantize="nf4"))
    problems = cfg.problems(Runtime(zero_stage=3, num_processes=2))
    assert any("ZeRO-3" in p and "quantize" in p for p in problems)
    assert not cfg.problems(Runtime(zero_stage=2, num_processes=2))


def test_targets_matching_nothing_in_the_component_are_refused():
    with pytest.raises(ConfigError, match=r"no Linear/Conv2d of the encoder matches peft.encoder_modules"):
        apply_peft(build_model(), PeftArgs(encoder="lora", encoder_modules=["query"]))
    with pytest.raises(ConfigError, match="already carries adapters"):
        apply_peft(apply_peft(build_model(), alone("decoder", "lora")), alone("decoder", "lora"))


def test_dec_column_honoured_in_f_t_lora(tmp_path):
    """F-T-LoRA: the decoder's embedding and output projection follow the decoder (frozen, adapted by LoRA only),
    not the fully trained encoder they are tied to in OFA."""
    base = build_model()
    args = PeftArgs(vision="freeze", encoder="full", decoder="lora", r=4)
    model = apply_peft(build_model(), args)
    encoder_embedding = model.get_input_embeddings().weight
    decoder_embedding = model.model.decoder.embed_tokens.weight
    assert decoder_embedding is not encoder_embedding
    assert model.get_output_embeddings().weight is decoder_embedding  # the decoder's own head stays tied to it
    assert encoder_embedding.requires_grad and not decoder_embedding.requires_grad

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    encoder_names = {n for n, _ in base.named_parameters() if component_of(n) == "encoder"}
    lora_names = {n for n in trainable if ".lora_" in n}
    assert trainable == encoder_names | lora_names
    assert lora_names and all(component_of(n.split(".lora_")[0]) == "decoder" for n in lora_names)
    counts = count_trainable(model)
    assert counts["decoder"]["trainable"] == 0 and counts["adapters"]["trainable"] == counts["adapters"]["total"]
    vocab_by_d = encoder_embedding.numel()
    assert counts["all"]["total"] == sum(p.numel() for p in base.parameters()) + vocab_by_d + counts["adapters"]["total"]

    before = decoder_embedding.detach().clone(), encoder_embedding.detach().clone()
    train_steps(model)
    assert torch.equal(model.model.decoder.embed_tokens.weight, before[0])
    assert not torch.equal(model.get_input_embeddings().weight, before[1])

    batch = make_batch(5)
    with torch.no_grad():
        reference = model(**batch).logits
    save_adapter(model, tmp_path / "adapter")
    reloaded = load_adapter(build_model().eval(), tmp_path / "adapter")
    assert reloaded.model.decoder.embed_tokens.weight is not reloaded.get_input_embeddings().weight
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, reference, rtol=0, atol=1e-6)
        assert not torch.allclose(build_model().eval()(**batch).logits, reference)  # training moved the outputs
    with pytest.raises(ValueError, match="untied"):
        merge_adapters(model)


@pytest.mark.parametrize("policy", [("freeze", "lora", "lora"), ("full", "full", "full"), ("lora", "freeze", "ia3")])
def test_equal_encoder_and_decoder_policies_keep_one_shared_embedding(policy):
    args = PeftArgs(**dict(zip(COMPONENTS, policy, strict=True)), r=4)
    model = apply_peft(build_model(), args)
    shared = model.get_input_embeddings().weight
    assert model.model.decoder.embed_tokens.weight is shared and model.get_output_embeddings().weight is shared
    assert shared.requires_grad == (policy[1] == "full")


def test_ia3_targets_are_miles():
    """MILE's IA3 (peft's BERT default: key, value, output.dense as feed-forward) per decoder layer: keys and values of
    self- and cross-attention scaled on their output (4 d), both attention output projections (2 d) and fc2 (ffn)
    on their input; per encoder layer 2 d + d + ffn. For BERT-base's decoder that is 12 x 7,680 = 92,160."""
    d, ffn = CONFIG.d_model, CONFIG.decoder_ffn_dim
    for component, per_layer in (("decoder", 6 * d + ffn), ("encoder", 3 * d + CONFIG.encoder_ffn_dim)):
        counts = count_trainable(apply_peft(build_model(), alone(component, "ia3")))
        assert counts["adapters"]["trainable"] == getattr(CONFIG, f"{component}_layers") * per_layer, component
