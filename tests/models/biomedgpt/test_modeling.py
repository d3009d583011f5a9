"""BiomedGPT model on the `test` preset: position buckets, caching, generation, padding, attention paths, I/O."""

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForSeq2SeqLM, DynamicCache, EncoderDecoderCache

from scaling.models.biomedgpt import BiomedGPTConfig, BiomedGPTForConditionalGeneration
from scaling.models.biomedgpt.modeling import (
    BiomedGPTAttention,
    dropout,
    image_relative_buckets,
    token_relative_buckets,
)
from scaling.models.biomedgpt.resnet import drop_path

PAD, BOS, EOS = 1, 0, 2
IMAGE_SIZE = 32


# ---------------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------------


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter (relative tables, c_attn and norms included) a non-trivial value."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("c_attn") or ("norm" in name or "_ln" in name or "bn" in name) and "weight" in name:
                param.copy_(1.0 + 0.2 * noise)
            else:
                param.copy_(0.2 * noise)
    return model


def build_model(**overrides) -> BiomedGPTForConditionalGeneration:
    """Test-preset model in eval mode, randomised weights, no dropout unless overridden."""
    config = BiomedGPTConfig.from_preset("test", **{"dropout": 0.0, **overrides})
    return randomize(BiomedGPTForConditionalGeneration(config)).eval()


@pytest.fixture(scope="module")
def model():
    return build_model()


def text(*token_lists: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded `<s> tokens </s>` batch and its attention mask."""
    rows = [[BOS, *tokens, EOS] for tokens in token_lists]
    width = max(map(len, rows))
    ids = torch.tensor([row + [PAD] * (width - len(row)) for row in rows])
    return ids, ids.ne(PAD).long()


def images(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def batch():
    """Three samples with different text lengths; the middle one has no image."""
    input_ids, attention_mask = text([11, 12, 13, 14, 15], [21, 22], [31, 32, 33])
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": images(3),
        "patch_masks": torch.tensor([True, False, True]),
    }


DECODER_INPUT = torch.tensor([[BOS, 41, 42, 43, 44, 45], [BOS, 51, 52, 53, 54, 55], [BOS, 61, 62, 63, 64, 65]])


# ---------------------------------------------------------------------------------------------------------------
# Position buckets against a direct transcription of OFA's definitions
# ---------------------------------------------------------------------------------------------------------------


def reference_token_bucket(relative: int, bucket_size: int, max_positions: int) -> int:
    mid = bucket_size // 2
    if abs(relative) <= mid:
        return relative + bucket_size - 1
    log_pos = math.ceil(math.log(abs(relative) / mid) / math.log((max_positions - 1) / mid) * (mid - 1)) + mid
    return int(math.copysign(log_pos, relative)) + bucket_size - 1


def test_token_buckets_match_ofa_definition():
    positions = torch.arange(1024)
    buckets = token_relative_buckets(positions, positions, 256, 1024)
    for relative in list(range(-1023, 1024, 7)) + [-129, -128, 128, 129, 1023]:
        i, j = max(relative, 0), max(-relative, 0)
        assert buckets[i, j].item() == reference_token_bucket(relative, 256, 1024), relative
    assert buckets.min().item() >= 0 and buckets.max().item() <= 2 * 256 - 2


def test_image_buckets_match_ofa_definition():
    size = 5
    span, num = 2 * size - 1, (2 * size - 1) ** 2 + 3
    ids = torch.arange(size * size + 1)
    buckets = image_relative_buckets(ids, ids, size)
    for p in range(size * size + 1):
        for q in range(size * size + 1):
            if p == 0 and q == 0:
                expected = num - 1
            elif q == 0:
                expected = num - 2
            elif p == 0:
                expected = num - 3
            else:
                (pr, pc), (qr, qc) = divmod(p - 1, size), divmod(q - 1, size)
                expected = (pr - qr + size - 1) * span + (pc - qc + size - 1)
            assert buckets[p, q].item() == expected, (p, q)


# ---------------------------------------------------------------------------------------------------------------
# Forward semantics
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_incremental_decoding_equals_full_forward(model, batch):
    full = model(**batch, decoder_input_ids=DECODER_INPUT, use_cache=False).logits
    for cache in (None, DynamicCache()):  # model-built EncoderDecoderCache, then a plain self-attention cache
        encoder_outputs = model.get_encoder()(**batch)
        past = cache
        steps = []
        for t in range(DECODER_INPUT.shape[1]):
            out = model(
                encoder_outputs=encoder_outputs,
                decoder_input_ids=DECODER_INPUT[:, t : t + 1],
                cache=past,
                use_cache=True,
            )
            past = out.cache
            steps.append(out.logits)
        if cache is None:
            assert isinstance(past, EncoderDecoderCache)
        assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-5


@torch.no_grad()
def test_image_code_targets_use_their_own_positions_per_sample_and_cache_consistently(model, batch):
    code_masks = torch.tensor([False, True, False])
    plain = model(**batch, decoder_input_ids=DECODER_INPUT).logits
    full = model(**batch, decoder_input_ids=DECODER_INPUT, code_masks=code_masks).logits
    assert (full[1] - plain[1]).abs().max() > 1e-3
    assert (full[[0, 2]] - plain[[0, 2]]).abs().max().item() <= 1e-5
    encoder_outputs, past, steps = model.get_encoder()(**batch), None, []
    for t in range(DECODER_INPUT.shape[1]):
        out = model(
            encoder_outputs=encoder_outputs,
            decoder_input_ids=DECODER_INPUT[:, t : t + 1],
            cache=past,
            code_masks=code_masks,
            use_cache=True,
        )
        past = out.cache
        steps.append(out.logits)
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-5


@torch.no_grad()
def test_padded_batch_equals_each_sample_alone(model, batch):
    batched = model(**batch, decoder_input_ids=DECODER_INPUT).logits
    for i in range(3):
        length = int(batch["attention_mask"][i].sum())
        alone = {"input_ids": batch["input_ids"][i : i + 1, :length]}
        if batch["patch_masks"][i]:
            alone["pixel_values"] = batch["pixel_values"][i : i + 1]
        logits = model(**alone, decoder_input_ids=DECODER_INPUT[i : i + 1]).logits
        assert (logits - batched[i : i + 1]).abs().max().item() <= 1e-5, i


@torch.no_grad()
def test_text_only_batch_without_pixel_values(model):
    input_ids, attention_mask = text([5, 6, 7], [8])
    out = model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=DECODER_INPUT[:2])
    assert out.logits.shape == (2, 6, model.config.vocab_size)
    assert out.encoder_last_hidden_state.shape[1] == input_ids.shape[1]
    assert torch.isfinite(out.logits).all()


@torch.no_grad()
def test_image_tokens_come_first_and_change_the_output(model, batch):
    with_image = model(**batch, decoder_input_ids=DECODER_INPUT)
    grid = (IMAGE_SIZE // 16) ** 2
    assert with_image.encoder_last_hidden_state.shape[1] == grid + batch["input_ids"].shape[1]
    text_only = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], decoder_input_ids=DECODER_INPUT
    )
    assert (with_image.logits[0] - text_only.logits[0]).abs().max() > 1e-3  # sample 0 sees its image
    assert (with_image.logits[1] - text_only.logits[1]).abs().max() <= 1e-5  # sample 1 has none


@torch.no_grad()
def test_inputs_embeds_attentions_and_hidden_states(model, batch):
    out = model(**batch, decoder_input_ids=DECODER_INPUT, output_attentions=True, output_hidden_states=True)
    embeds = model.get_input_embeddings()(batch["input_ids"])
    from_embeds = model(**{**batch, "input_ids": None}, inputs_embeds=embeds, decoder_input_ids=DECODER_INPUT)
    assert (from_embeds.logits - out.logits).abs().max().item() <= 1e-5
    source, target, layers = out.encoder_last_hidden_state.shape[1], DECODER_INPUT.shape[1], model.config.encoder_layers
    heads = model.config.encoder_attention_heads
    assert len(out.encoder_hidden_states) == len(out.decoder_hidden_states) == layers + 1
    assert out.encoder_attentions[0].shape == (3, heads, source, source)
    assert out.decoder_attentions[0].shape == (3, heads, target, target)
    assert out.cross_attentions[0].shape == (3, heads, target, source)
    image_less = out.cross_attentions[-1][1, :, :, : (IMAGE_SIZE // 16) ** 2]  # sample 1 has no image
    assert image_less.abs().max().item() == 0.0
    assert torch.allclose(out.decoder_attentions[0].sum(-1), torch.ones(3, heads, target))
    with pytest.raises(TypeError, match="patch_mask"):
        model(**batch, decoder_input_ids=DECODER_INPUT, patch_mask=batch["patch_masks"])


def test_fused_kernel_equals_explicit_attention_in_outputs_and_gradients(batch, monkeypatch):
    labels = DECODER_INPUT[:, 1:]
    results = {}
    for kernel in ("fused", "explicit"):
        model = build_model()
        monkeypatch.setattr(BiomedGPTAttention, "fused_kernel_pays", lambda self, q, bias, kernel=kernel: kernel == "fused")
        calls = []
        monkeypatch.setattr(F, "scaled_dot_product_attention", counted(F.scaled_dot_product_attention, calls))
        out = model(**batch, labels=labels)
        out.loss.backward()
        assert bool(calls) == (kernel == "fused")  # the kernel asked for is the one that ran
        grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        results[kernel] = out.logits.detach(), grads
    (fused_logits, fused_grads), (explicit_logits, explicit_grads) = results["fused"], results["explicit"]
    assert (fused_logits - explicit_logits).abs().max().item() <= 1e-4
    assert fused_grads.keys() == explicit_grads.keys()
    assert "model.encoder.image_rel_pos_table_list.0.weight" in fused_grads  # the bias is differentiated
    for name in fused_grads:
        assert torch.allclose(fused_grads[name], explicit_grads[name], atol=1e-4), name


def counted(function, calls: list):
    """`function`, appending to `calls` on every call."""

    def wrapper(*args, **kwargs):
        calls.append(1)
        return function(*args, **kwargs)

    return wrapper


def test_attention_kernel_choice_on_cpu():
    attention = build_model().model.encoder.layers[0].self_attn
    eager = build_model(attn_implementation="eager").model.encoder.layers[0].self_attn
    assert attention.config._attn_implementation == "sdpa"

    def pays(module, queries: int, keys: int, grad: bool) -> bool:
        q = torch.zeros(1, 4, queries, 16, requires_grad=grad)
        return module.fused_kernel_pays(q, torch.zeros(1, 4, queries, keys))

    assert pays(attention, 608, 608, grad=False)  # an encoder at inference: the flash kernel wins
    assert not pays(attention, 608, 608, grad=True)  # training: SDPA would take its math path
    assert pays(attention, 1, 608, grad=False)  # a decoding step
    assert pays(attention, 256, 256, grad=False)
    assert not pays(eager, 608, 608, grad=False)
    with torch.no_grad():
        assert pays(attention, 608, 608, grad=True)  # no gradient is recorded under no_grad


def test_attn_implementation_is_set_from_the_config():
    for implementation in ("sdpa", "eager"):
        assert build_model(attn_implementation=implementation).config._attn_implementation == implementation


def test_loss_ignores_minus_100_applies_label_smoothing_and_starts_decoder_with_bos(batch):
    model = build_model(label_smoothing=0.1)
    labels = torch.tensor([[41, 42, EOS, -100], [51, EOS, -100, -100], [61, 62, 63, EOS]])
    out = model(**batch, labels=labels)
    decoder_input_ids = torch.tensor([[BOS, 41, 42, EOS], [BOS, 51, EOS, PAD], [BOS, 61, 62, 63]])
    assert torch.equal(model.prepare_decoder_input_ids_from_labels(labels), decoder_input_ids)
    logits = model(**batch, decoder_input_ids=decoder_input_ids).logits
    kept = labels.ne(-100)
    expected = torch.nn.functional.cross_entropy(logits[kept], labels[kept], label_smoothing=0.1)
    assert torch.allclose(out.loss, expected, atol=1e-5)



@pytest.mark.parametrize("variant", ["plain", "gradient_checkpointing", "decoder_prefix"])
def test_loss_without_logits_runs_the_last_decoder_layer_on_labelled_rows_with_the_same_loss_and_gradients(
        batch, variant: str):
    """prompt_type=prev_output: the prompt fills the decoder, only the answer is labelled."""
    labels = torch.tensor([[-100, -100, 41, EOS], [-100, 51, EOS, -100], [-100, -100, -100, EOS]])
    decoder_input_ids = torch.tensor([[BOS, 11, 12, 41], [BOS, 21, 51, PAD], [BOS, 31, 32, 33]])
    losses, grads, rows = [], [], []
    for return_logits in (True, False):
        model = build_model(label_smoothing=0.1).train()
        extra = {}
        if variant == "gradient_checkpointing":
            model.activation_checkpointing_enable({"use_reentrant": False})
        if variant == "decoder_prefix":
            extra["prefix_key_values"] = random_prefix(model.config, length=2)
        seen = {"first": set(), "last": set()}  # the positions each layer's feed-forward ran on
        for name, layer in (("first", model.get_decoder().layers[0]), ("last", model.get_decoder().layers[-1])):
            layer.fc1.register_forward_hook(lambda m, args, out, ran=seen[name]: ran.add(args[0].shape[1]))
        out = model(**batch, decoder_input_ids=decoder_input_ids, labels=labels, return_logits=return_logits,
                    **extra)
        assert (out.logits is None) == (not return_logits)
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        rows.append(seen)
    assert rows == [{"first": {4}, "last": {4}}, {"first": {4}, "last": {2}}]  # at most 2 labels in a row
    assert torch.allclose(losses[0], losses[1], atol=1e-6)
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-5)


def test_loss_without_logits_of_a_batch_without_labels_is_nan_not_an_error(batch):
    """The training loop counts and skips a non-finite loss; a batch whose answers were all cut must reach it."""
    model = build_model().train()
    out = model(**batch, decoder_input_ids=DECODER_INPUT, labels=torch.full((3, 6), -100), return_logits=False)
    assert out.loss.isnan()


def test_decoder_longer_than_its_positions_is_refused_with_the_fix(model, batch):
    too_long = torch.full((3, model.config.max_positions + 3), 41)
    with pytest.raises(ValueError, match="lower data.max_src_len"):
        model(**batch, decoder_input_ids=too_long)


def random_prefix(config: BiomedGPTConfig, length: int, batch: int = 1, seed: int = 0) -> dict:
    """prefix_key_values with `length` random keys/values per layer, for encoder and decoder."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, config.decoder_attention_heads, length, config.d_model // config.decoder_attention_heads)
    return {
        side: [(torch.randn(shape, generator=g), torch.randn(shape, generator=g)) for _ in range(layers)]
        for side, layers in (("encoder", config.encoder_layers), ("decoder", config.decoder_layers))
    }


def test_prefix_key_values_are_visible_and_empty_prefix_is_a_no_op(model, batch):
    with torch.no_grad():
        plain = model(**batch, decoder_input_ids=DECODER_INPUT).logits
        empty = model(
            **batch, decoder_input_ids=DECODER_INPUT, prefix_key_values=random_prefix(model.config, 0, seed=1)
        ).logits
        prefixed = model(
            **batch, decoder_input_ids=DECODER_INPUT, prefix_key_values=random_prefix(model.config, 3, seed=1)
        ).logits
    assert (empty - plain).abs().max().item() <= 1e-5  # float rounding: the keys become a copy in another layout
    assert (prefixed - plain).abs().max().item() > 1e-3
    # gradients reach the prefix tensors (what prefix tuning trains)
    trainable = random_prefix(model.config, 3, seed=2)
    for key, value in trainable["decoder"] + trainable["encoder"]:
        key.requires_grad_(True)
        value.requires_grad_(True)
    model(**batch, decoder_input_ids=DECODER_INPUT, prefix_key_values=trainable).logits.sum().backward()
    assert all(k.grad is not None and k.grad.abs().sum() > 0 for k, _ in trainable["encoder"] + trainable["decoder"])
    model.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def manual_greedy(model, batch, steps: int) -> torch.Tensor:
    """Argmax loop without cache; finished rows continue with pad, as generate() does."""
    sequences = torch.full((batch["input_ids"].shape[0], 1), BOS)
    finished = torch.zeros(sequences.shape[0], dtype=torch.bool)
    for _ in range(steps):
        next_token = model(**batch, decoder_input_ids=sequences, use_cache=False).logits[:, -1].argmax(-1)
        next_token = next_token.masked_fill(finished, PAD)
        finished |= next_token.eq(EOS)
        sequences = torch.cat([sequences, next_token[:, None]], dim=1)
        if finished.all():
            break
    return sequences


def test_greedy_generate_equals_manual_argmax_loop(model, batch):
    generated = model.generate(**batch, max_new_tokens=6, do_sample=False)
    assert torch.equal(generated, manual_greedy(model, batch, 6))


def test_beam_search_returns_sequences_whose_scores_match_teacher_forcing(model, batch):
    out = model.generate(
        **batch,
        max_new_tokens=5,
        num_beams=3,
        num_return_sequences=2,
        length_penalty=0.0,
        return_dict_in_generate=True,
        output_scores=True,
    )
    sequences = out.sequences
    assert sequences.shape[0] == 6 and (sequences[:, 0] == BOS).all()
    assert ((sequences >= 0) & (sequences < model.config.vocab_size)).all()
    expanded = {key: value.repeat_interleave(2, dim=0) for key, value in batch.items()}
    with torch.no_grad():
        logits = model(**expanded, decoder_input_ids=sequences[:, :-1]).logits
    log_probs = logits.log_softmax(-1).gather(-1, sequences[:, 1:, None]).squeeze(-1)
    after_eos = sequences[:, 1:].eq(EOS).cumsum(-1) - sequences[:, 1:].eq(EOS).long() > 0
    recomputed = log_probs.masked_fill(after_eos, 0.0).sum(-1)
    assert torch.allclose(recomputed, out.sequences_scores, atol=1e-4)


def test_sampling_and_beam_search_with_prefix_run(model, batch):
    prefix = random_prefix(model.config, length=2, batch=3)  # per-sample prefixes, repeated over the beams
    torch.manual_seed(0)
    sampled = model.generate(**batch, max_new_tokens=4, do_sample=True, top_k=20)
    beams = model.generate(**batch, max_new_tokens=4, num_beams=2, prefix_key_values=prefix)
    assert sampled.shape[0] == 3 and beams.shape[0] == 3


def test_encoder_positions_are_projected_once_per_generate_call_and_afresh_under_gradients(model, batch):
    calls = []
    hook = model.model.decoder.cross_pos_k_linear.register_forward_hook(lambda *args: calls.append(1))
    try:
        for beams in (1, 3):
            calls.clear()
            out = model.generate(**batch, max_new_tokens=5, min_new_tokens=5, num_beams=beams)
            assert out.shape[1] == 6 and len(calls) == 1, beams  # 5 decoding steps, one projection
        encoder_outputs = model.get_encoder()(**batch)
        calls.clear()
        with torch.enable_grad():
            for _ in range(2):  # training-style forwards: nothing is kept that would miss the gradient
                logits = model(encoder_outputs=encoder_outputs, decoder_input_ids=DECODER_INPUT).logits
                assert logits.requires_grad
        assert len(calls) == 2
    finally:
        hook.remove()


@torch.no_grad()
def test_resnet_features_are_channels_last_and_patch_tokens_need_no_copy(model, batch):
    features = model.model.encoder.embed_images(batch["pixel_values"])
    assert features.is_contiguous(memory_format=torch.channels_last)
    assert features.flatten(2).transpose(1, 2).is_contiguous()  # (B, N, C) for image_proj, a view


# ---------------------------------------------------------------------------------------------------------------
# Training features and serialisation
# ---------------------------------------------------------------------------------------------------------------


def test_drop_path_drops_whole_samples_and_rises_over_depth():
    torch.manual_seed(0)
    x = torch.ones(64, 5, 8)
    out = drop_path(x, 0.5, training=True)
    per_sample = out.flatten(1)
    assert ((per_sample == 0).all(1) | (per_sample == 2.0).all(1)).all()
    assert 0 < (per_sample == 0).all(1).sum() < 64
    config = BiomedGPTConfig.from_preset("test", encoder_layers=3, encoder_drop_path_rate=0.2)
    layers = BiomedGPTForConditionalGeneration(config).model.encoder.layers
    assert [getattr(layer.drop_path, "rate", 0.0) for layer in layers] == pytest.approx([0.0, 0.1, 0.2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_dropout_drops_at_rate_p_scales_the_rest_and_follows_the_seed(dtype):
    x = torch.ones(3, 1001, 67, dtype=dtype, requires_grad=True)  # an odd element count: a partly used random word
    torch.manual_seed(0)
    out = dropout(x, 0.1, training=True)
    kept = out != 0
    assert out.shape == x.shape and out.dtype == dtype
    assert out[kept].unique().tolist() == [torch.tensor(1 / 0.9, dtype=dtype).item()]
    # 201,201 draws: the drop rate within 5 standard deviations of 0.1 (rounded to 6554 / 65536)
    rate, sd = 1 - kept.float().mean().item(), math.sqrt(0.1 * 0.9 / x.numel())
    assert abs(rate - 6554 / 65536) < 5 * sd
    by_chunk = kept.flatten()[: x.numel() // 4 * 4].view(-1, 4).float().mean(0)  # each 16-bit chunk of a word
    assert (by_chunk - 0.9).abs().max() < 5 * math.sqrt(0.1 * 0.9 / (x.numel() // 4))
    out.sum().backward()
    assert torch.equal(x.grad, out.detach())  # gradient = mask * 1 / (1 - p)
    torch.manual_seed(0)
    assert torch.equal(dropout(x, 0.1, training=True), out)
    assert not torch.equal(dropout(x, 0.1, training=True), out)
    assert torch.equal(dropout(x, 0.1, training=False), x) and torch.equal(dropout(x, 0.0, training=True), x)


def test_gradient_checkpointing_gives_the_same_gradients(batch):
    labels = torch.tensor([[41, 42, EOS], [51, EOS, -100], [61, 62, EOS]])

    def gradients(checkpointing: bool) -> dict:
        model = build_model(dropout=0.1, encoder_drop_path_rate=0.1, decoder_drop_path_rate=0.1).train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert all(layer.gradient_checkpointing for layer in model.model.encoder.layers)
        torch.manual_seed(0)
        model(**batch, labels=labels).loss.backward()
        return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys() and len(plain) > 50
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-6), name


def test_save_pretrained_round_trip_with_tied_weights(model, batch, tmp_path):
    model.save_pretrained(tmp_path)
    stored = load_file(tmp_path / "model.safetensors")
    assert "model.encoder.embed_tokens.weight" in stored
    assert "model.decoder.output_projection.weight" not in stored and "model.decoder.embed_tokens.weight" not in stored
    assert (
        "model.encoder.layers.0.self_attn.c_attn" in stored
        and "model.decoder.layers.1.cross_attn.q_proj.weight" in stored
    )
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, BiomedGPTForConditionalGeneration)
    decoder = loaded.model.decoder
    assert decoder.output_projection.weight is loaded.model.encoder.embed_tokens.weight is decoder.embed_tokens.weight
    with torch.no_grad():
        before = model(**batch, decoder_input_ids=DECODER_INPUT).logits
        after = loaded(**batch, decoder_input_ids=DECODER_INPUT).logits
    assert torch.equal(before, after)


def test_oversized_images_and_wrong_prefix_depth_raise_clear_errors(model, batch):
    with pytest.raises(ValueError, match=r"7x7 grid, larger than image_bucket_size 6; resize to at most 96 px"):
        model(**{**batch, "pixel_values": torch.zeros(3, 3, 112, 112)}, decoder_input_ids=DECODER_INPUT)
    prefix = random_prefix(model.config, 2)
    prefix["decoder"] = prefix["decoder"][:1]
    with pytest.raises(ValueError, match=r"prefix_key_values\['decoder'\] has 1 entries for 2 layers"):
        model(**batch, decoder_input_ids=DECODER_INPUT, prefix_key_values=prefix)
