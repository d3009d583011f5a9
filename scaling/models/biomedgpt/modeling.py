"""BiomedGPT / OFA encoder-decoder as a transformers `PreTrainedModel` + `GenerationMixin`.

Architecture (OFA-Sys/OFA `models/ofa/unify_transformer*.py`, `unify_multihead_attention.py`, `resnet.py`; BiomedGPT
uses the same code): a ResNet turns the image into a 16x-downsampled grid of patch tokens that sit *before*
the text tokens; absolute positions never enter the hidden states but only the attention logits, as a bias
`(LN(pos) W_q)(LN(pos) W_k)^T` computed once per forward, plus per-layer learned relative-position tables (token
buckets for text, 2-D buckets for the image grid). Pre-LN NormFormer layers with `c_attn` head scaling, attention
scale `(head_dim * 2) ** -0.5`, per-sample drop path rising linearly over depth, tied output projection.

State-dict keys (`model.` + the HF-port names of reference §2.7; `i` = layer index):

    model.encoder.embed_tokens.weight                                  [vocab, d]  (source of the ties below)
    model.encoder.type_embedding.weight                                [2, d]
    model.encoder.layernorm_embedding.{weight,bias}
    model.encoder.patch_layernorm_embedding.{weight,bias}
    model.encoder.embed_images.{conv1,bn1,layer1..3}.*                 ResNet, names of OFA resnet.py
    model.encoder.image_proj.{weight,bias}                             [d, 16 * resnet_width]
    model.encoder.embed_positions.weight                               [max_positions + 2, d]
    model.encoder.embed_image_positions.weight                         [image_bucket_size ** 2 + 1, d]
    model.encoder.{pos_ln,image_pos_ln}.{weight,bias}
    model.encoder.{pos_q_linear,pos_k_linear}.{weight,bias}
    model.encoder.layers.i.self_attn.{q_proj,k_proj,v_proj,out_proj}.{weight,bias} ; .self_attn.c_attn [heads]
    model.encoder.layers.i.{self_attn_layer_norm,self_attn_mid_layer_norm}.{weight,bias}
    model.encoder.layers.i.{fc1,fc2,ffn_layer_norm,final_layer_norm}.{weight,bias}
    model.encoder.layer_norm.{weight,bias}
    model.encoder.token_rel_pos_table_list.i.weight                    [2 * token_bucket_size - 1, heads]
    model.encoder.image_rel_pos_table_list.i.weight                    [(2 * image_bucket_size - 1) ** 2 + 3, heads]
    model.decoder.embed_tokens.weight                                  tied to model.encoder.embed_tokens.weight
    model.decoder.output_projection.weight                             tied to model.encoder.embed_tokens.weight
    model.decoder.{layernorm_embedding,code_layernorm_embedding,pos_ln,image_pos_ln}.{weight,bias}
    model.decoder.{embed_positions,embed_image_positions}.weight
    model.decoder.{self_pos_q_linear,self_pos_k_linear,cross_pos_q_linear,cross_pos_k_linear}.{weight,bias}
    model.decoder.layers.i.{self_attn,cross_attn}.{q_proj,k_proj,v_proj,out_proj}.{weight,bias} ; .{..}.c_attn
    model.decoder.layers.i.{self_attn,cross_attn}_{layer_norm,mid_layer_norm}.{weight,bias}
    model.decoder.layers.i.{fc1,fc2,ffn_layer_norm,final_layer_norm}.{weight,bias}
    model.decoder.layer_norm.{weight,bias}
    model.decoder.{token,image}_rel_pos_table_list.i.weight

No buffers besides the ResNet's BatchNorm statistics: the relative-bucket index matrices (fairseq/HF buffers
`token_rp_bucket`, `image_rp_bucket`) and the decoder's `image_position_idx` are pure functions of positions, computed
by `token_relative_buckets`, `image_relative_buckets` and `code_position_ids` below; converters drop those buffers.
The decoder's `code_layernorm_embedding`, `image_pos_ln`, `embed_image_positions` and `image_rel_pos_table_list` serve
image-code targets (`code_masks`) only, so they get no gradient in text-only training (DDP needs
`find_unused_parameters=True`; the same holds for the vision parameters on batches without images).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import ModelOutput, Seq2SeqLMOutput, Seq2SeqModelOutput
from transformers.utils.deprecation import deprecate_kwarg

from .configuration import BiomedGPTConfig
from .resnet import DropPath, ResNet, linear_rates

# ----------------------------------------------------------------------------------------------------------------
# Position buckets (pure functions of positions; equal to OFA's make_token/image_bucket_position tables)
# ----------------------------------------------------------------------------------------------------------------


def token_relative_buckets(
    query_positions: torch.Tensor, key_positions: torch.Tensor, bucket_size: int, max_positions: int
) -> torch.Tensor:
    """(Q,) x (K,) positions -> (Q, K) bucket ids in [0, 2 * bucket_size - 1): exact within +-bucket_size/2, log beyond."""
    relative = query_positions[:, None] - key_positions[None, :]
    mid = bucket_size // 2
    distance = relative.abs().clamp(max=max_positions - 1)
    # float32 like OFA, so ceil() lands on the same integers
    log_ratio = torch.log(distance.clamp(min=mid).float() / mid) / math.log((max_positions - 1) / mid)
    log_distance = torch.ceil(log_ratio * (mid - 1)).long() + mid
    bucket = torch.where(distance <= mid, relative, torch.sign(relative) * log_distance)
    return bucket + bucket_size - 1


def image_grid_position_ids(height: int, width: int, bucket_size: int, device=None) -> torch.Tensor:
    """Ids of an image grid, row-major: 1 + row * bucket_size + col (id 0 is OFA's reserved 'cls' slot)."""
    rows = torch.arange(height, device=device)[:, None]
    cols = torch.arange(width, device=device)[None, :]
    return (1 + rows * bucket_size + cols).flatten()


def image_relative_buckets(query_ids: torch.Tensor, key_ids: torch.Tensor, bucket_size: int) -> torch.Tensor:
    """(Q,) x (K,) image position ids -> (Q, K) ids of the 2-D relative offset; id 0 pairs use the last 3 slots."""
    span = 2 * bucket_size - 1
    num_buckets = span * span + 3
    q_row, q_col = (query_ids - 1).div(bucket_size, rounding_mode="floor"), (query_ids - 1) % bucket_size
    k_row, k_col = (key_ids - 1).div(bucket_size, rounding_mode="floor"), (key_ids - 1) % bucket_size
    bucket = (q_row[:, None] - k_row[None, :] + bucket_size - 1) * span + (
        q_col[:, None] - k_col[None, :] + bucket_size - 1
    )
    q_cls, k_cls = (query_ids == 0)[:, None], (key_ids == 0)[None, :]
    bucket = torch.where(q_cls, num_buckets - 3, bucket)
    bucket = torch.where(k_cls, num_buckets - 2, bucket)
    return torch.where(q_cls & k_cls, num_buckets - 1, bucket)


def code_position_ids(length: int, code_image_size: int, bucket_size: int, device=None) -> torch.Tensor:
    """Image position ids of decoder steps for image-code targets: [0, code grid ids..., then 1024 for the rest].

    OFA's buffer `image_position_idx` (length 1026 in OFA/BiomedGPT main, 1025 in the HF port) is a prefix of this;
    1024 is capped to the last table row for presets whose table is smaller.
    """
    window = code_image_size // 8
    ids = torch.cat([torch.zeros(1, dtype=torch.long), image_grid_position_ids(window, window, bucket_size)])
    ids = F.pad(ids, (0, max(0, length - ids.numel())), value=min(1024, bucket_size**2))
    return ids[:length].to(device)


class RelativePositionTable(nn.Embedding):
    """Per-layer learned bias per (bucket, head); zero-initialised as in OFA."""

    def forward(self, buckets: torch.Tensor) -> torch.Tensor:
        """(Q, K) bucket ids -> (1, heads, Q, K) bias."""
        # index_select rather than F.embedding: the backward of the 576 x 576 image buckets (index_add instead of
        # the embedding's sort-and-accumulate) takes half the time on CPU
        bias = self.weight.index_select(0, buckets.flatten()).view(*buckets.shape, -1)  # (Q, K, H)
        return bias.permute(2, 0, 1).unsqueeze(0)  # (1, H, Q, K)


def add_block_diagonal(bias: torch.Tensor, image_bias: torch.Tensor | None, text_bias: torch.Tensor) -> torch.Tensor:
    """(1 or B, H, N + L, N + L) bias plus the (1, H, N, N) image and (1, H, L, L) text biases on its diagonal blocks
    (nothing between image and text), in the bias's dtype; one copy of `bias`, no padded intermediates."""
    bias = bias.clone()
    num_image = 0 if image_bias is None else image_bias.shape[-1]
    if image_bias is not None:
        bias[..., :num_image, :num_image] += image_bias
    bias[..., num_image:, num_image:] += text_bias
    return bias


def position_heads(linear: nn.Linear, positions: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, L, d) normalised position embeddings -> (B, heads, L, head_dim) projections for the position bias."""
    return linear(positions).unflatten(-1, (num_heads, -1)).transpose(1, 2)


def absolute_position_bias(query_heads: torch.Tensor, key_heads: torch.Tensor, scaling: float) -> torch.Tensor:
    """(Bq, H, Q, hd) and (Bk, H, K, hd) position projections -> (max(Bq, Bk), H, Q, K) logit bias."""
    return (query_heads * scaling) @ key_heads.transpose(-1, -2)


def all_kept(keep: torch.Tensor) -> bool:
    """Whether a keep mask is all True, where its values may be read: meta tensors (FLOP counts of sizes too large
    to run) have none, and reading them would break a torch.compile graph; both answer False (equal FLOPs)."""
    if keep.device.type == "meta" or torch.compiler.is_compiling():
        return False
    return bool(keep.all())


def additive_mask(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool keep mask (True = attend) -> float mask with 0 / dtype-min."""
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)


# ----------------------------------------------------------------------------------------------------------------
# Attention and layers
# ----------------------------------------------------------------------------------------------------------------


def keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """Bool mask of `x`'s shape, True with probability 1 - p rounded to a multiple of 1/65536: 16 random bits per
    element, drawn 64 at a time from torch's default generator (so seeding and checkpoint's RNG replay apply)."""
    numel = x.numel()
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2**63), None)
    return words.view(torch.int16)[:numel].view(x.shape).ge(round(p * 65536) - 32768)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """F.dropout with a cheaper mask on CPU, where torch draws 32 random bits per element from one serial generator
    (8 % of a base training step on 2 cores); accelerators keep torch's fused kernel."""
    if not training or p == 0.0 or p >= 1.0 or x.device.type != "cpu":
        return F.dropout(x, p, training)
    return x * keep_mask(x, p).to(x.dtype).mul_(1.0 / (1.0 - p))


class Dropout(nn.Dropout):
    """nn.Dropout through `dropout`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


def in_matmul_dtype(x: torch.Tensor) -> torch.Tensor:
    """`x` in the dtype autocast gives matmul inputs (unchanged when autocast is off): cast once, an input feeding
    several projections is not cast again by each of them."""
    device = x.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return x.to(torch.get_autocast_dtype(device))
    return x


def cross_keys_cached(cache: Cache | None) -> bool:
    """Whether the cache already holds the cross-attention keys and values (decoding steps after the first)."""
    return isinstance(cache, EncoderDecoderCache) and bool(cache.is_updated.get(0))


def match_batch(tensor: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Broadcast a batch-1 tensor or repeat a per-sample one for beam-expanded batches (B -> B * k)."""
    if tensor.shape[0] == batch_size:
        return tensor
    if tensor.shape[0] == 1:
        return tensor.expand(batch_size, *tensor.shape[1:])
    if batch_size % tensor.shape[0]:
        raise ValueError(f"prefix batch {tensor.shape[0]} does not divide the model batch {batch_size}")
    return tensor.repeat_interleave(batch_size // tensor.shape[0], dim=0)


def take_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(B, T, d) states at the (B, K) positions `rows` -> (B, K, d)."""
    return x.gather(1, rows[..., None].expand(-1, -1, x.shape[-1]))


def take_bias_rows(bias: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(1 or B, H, T, S) attention bias, the query rows `rows` (B, K) of it -> (B, H, K, S)."""
    bias = bias.expand(rows.shape[0], *bias.shape[1:])
    return bias.gather(2, rows[:, None, :, None].expand(-1, bias.shape[1], -1, bias.shape[-1]))


@torch.compiler.disable  # K is read from the data: under torch.compile the graph breaks here on purpose
def labelled_rows(labels: torch.Tensor) -> torch.Tensor | None:
    """(B, K) positions of each row's labelled tokens in order, padded with unlabelled ones (K = the most labels of
    any row); None when every position or none is labelled, or on the meta device, where the count cannot be read."""
    if labels.device.type == "meta":
        return None
    labelled = labels != -100
    k = int(labelled.sum(1).max())
    if k in (0, labels.shape[1]):
        return None
    return labelled.to(torch.uint8).argsort(dim=1, descending=True, stable=True)[:, :k]


class BiomedGPTAttention(nn.Module):
    """Multi-head attention with an additive logit bias, OFA scaling, `c_attn` head scaling and optional prefix."""

    def __init__(self, config: BiomedGPTConfig, num_heads: int, layer_idx: int, is_cross_attention: bool = False):
        super().__init__()
        self.config = config
        self.num_heads = num_heads
        self.head_dim = config.d_model // num_heads
        self.scaling = (self.head_dim * config.attn_scale_factor) ** -0.5
        self.layer_idx = layer_idx
        self.is_cross_attention = is_cross_attention
        self.dropout = config.attention_dropout
        self.q_proj = nn.Linear(config.d_model, config.d_model)
        self.k_proj = nn.Linear(config.d_model, config.d_model)
        self.v_proj = nn.Linear(config.d_model, config.d_model)
        self.out_proj = nn.Linear(config.d_model, config.d_model)
        self.c_attn = nn.Parameter(torch.ones(num_heads)) if config.normformer else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        attn_bias: torch.Tensor,
        key_value_states: torch.Tensor | None = None,
        cache: Cache | None = None,
        prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T, d) -> (B, T, d); `attn_bias` (B or 1, H, T, S) already holds positions and masks."""
        batch, length, _ = hidden_states.shape
        hidden_states = in_matmul_dtype(hidden_states)  # feeds q, k and v
        q = self.q_proj(hidden_states).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)  # (B,H,T,hd)
        k, v = self._keys_values(hidden_states if key_value_states is None else key_value_states, cache)
        if prefix is not None:
            # Prefix keys: always visible, no position bias (OFA prompt_kv semantics).
            prefix_k, prefix_v = (match_batch(t, batch).to(k.dtype) for t in prefix)
            k, v = torch.cat([prefix_k, k], dim=2), torch.cat([prefix_v, v], dim=2)
            attn_bias = F.pad(attn_bias, (prefix_k.shape[2], 0))
        attn_bias = attn_bias.to(q.dtype)
        p = self.dropout if self.training else 0.0
        weights = None
        if output_attentions or not self.fused_kernel_pays(q, attn_bias):
            # A bf16/fp16 softmax accumulates in float32 and rounds once, like OFA's float softmax cast back.
            weights = F.softmax(torch.matmul(q * self.scaling, k.transpose(-1, -2)) + attn_bias, dim=-1)  # (B,H,T,S)
            out = dropout(weights, p, self.training) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, dropout_p=p, scale=self.scaling)
        if self.c_attn is not None:
            out = out * self.c_attn.view(1, -1, 1, 1).to(out.dtype)
        out = out.transpose(1, 2).reshape(batch, length, -1)  # (B, H, T, hd) -> (B, T, d)
        return self.out_proj(out), weights

    def fused_kernel_pays(self, q: torch.Tensor, attn_bias: torch.Tensor) -> bool:
        """Whether SDPA's fused kernel beats the explicit matmul-softmax-matmul here (always on accelerators)."""
        if self.config._attn_implementation == "eager":
            return False
        if q.device.type != "cpu":
            return True
        # Measured on CPU (torch 2.13, 12 heads): any gradient sends SDPA to its math path, 2-3x slower than the
        # explicit form; without one its flash kernel is as fast or faster at every size, decoding steps included
        # (bf16: 2-3x at one query over 1-608 keys, 3.7x for 608 x 608; fp32: 1.0-2.9x).
        return not (torch.is_grad_enabled() and (q.requires_grad or attn_bias.requires_grad))

    def _project(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S, d) -> keys, values (B, H, S, hd)."""
        shape = (states.shape[0], states.shape[1], self.num_heads, self.head_dim)
        return self.k_proj(states).view(shape).transpose(1, 2), self.v_proj(states).view(shape).transpose(1, 2)

    def _keys_values(self, states: torch.Tensor, cache: Cache | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of this step, appended to (self) or read once from (cross) the cache."""
        if cache is None:
            return self._project(states)
        if isinstance(cache, EncoderDecoderCache):
            if self.is_cross_attention:
                cross = cache.cross_attention_cache
                if cache.is_updated.get(self.layer_idx):
                    return cross.layers[self.layer_idx].keys, cross.layers[self.layer_idx].values
                cache.is_updated[self.layer_idx] = True
                return cross.update(*self._project(states), self.layer_idx)
            cache = cache.self_attention_cache
        if self.is_cross_attention:  # a plain self-attention cache: encoder keys are recomputed every step
            return self._project(states)
        return cache.update(*self._project(states), self.layer_idx)


class BiomedGPTBlock(GradientCheckpointingLayer):
    """Shared pre-LN residual plumbing: dropout + per-sample drop path, and the NormFormer feed-forward."""

    def __init__(self, config: BiomedGPTConfig, ffn_dim: int, drop_path_rate: float):
        super().__init__()
        self.dropout = Dropout(config.dropout)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0.0 else nn.Identity()
        self.activation = ACT2FN[config.activation_function]
        self.activation_dropout = Dropout(config.activation_dropout)
        self.fc1 = nn.Linear(config.d_model, ffn_dim)
        self.ffn_layer_norm = nn.LayerNorm(ffn_dim) if config.normformer else nn.Identity()
        self.fc2 = nn.Linear(ffn_dim, config.d_model)
        self.final_layer_norm = nn.LayerNorm(config.d_model)

    def residual(self, residual: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        """residual + drop_path(dropout(branch))."""
        return residual + self.drop_path(self.dropout(branch))

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-LN FFN sub-block with the NormFormer layer norm after the activation."""
        h = self.activation_dropout(self.activation(self.fc1(self.final_layer_norm(x))))
        return self.residual(x, self.fc2(self.ffn_layer_norm(h)))


def mid_layer_norm(config: BiomedGPTConfig) -> nn.Module:
    """NormFormer's LayerNorm on the attention output (fairseq --scale-attn)."""
    return nn.LayerNorm(config.d_model) if config.normformer else nn.Identity()


class BiomedGPTEncoderLayer(BiomedGPTBlock):
    """Self-attention + FFN over the [image; text] sequence."""

    def __init__(self, config: BiomedGPTConfig, layer_idx: int, drop_path_rate: float):
        super().__init__(config, config.encoder_ffn_dim, drop_path_rate)
        self.self_attn = BiomedGPTAttention(config, config.encoder_attention_heads, layer_idx)
        self.self_attn_layer_norm = nn.LayerNorm(config.d_model)
        self.self_attn_mid_layer_norm = mid_layer_norm(config)

    def forward(self, hidden_states, attn_bias, prefix=None, output_attentions=False):
        """(B, S, d) -> (B, S, d), attention weights or None."""
        h, weights = self.self_attn(
            self.self_attn_layer_norm(hidden_states), attn_bias, prefix=prefix, output_attentions=output_attentions
        )
        hidden_states = self.residual(hidden_states, self.self_attn_mid_layer_norm(h))
        return self.feed_forward(hidden_states), weights


class BiomedGPTDecoderLayer(BiomedGPTBlock):
    """Causal self-attention + cross-attention to the encoder + FFN."""

    def __init__(self, config: BiomedGPTConfig, layer_idx: int, drop_path_rate: float):
        super().__init__(config, config.decoder_ffn_dim, drop_path_rate)
        heads = config.decoder_attention_heads
        self.self_attn = BiomedGPTAttention(config, heads, layer_idx)
        self.self_attn_layer_norm = nn.LayerNorm(config.d_model)
        self.self_attn_mid_layer_norm = mid_layer_norm(config)
        self.cross_attn = BiomedGPTAttention(config, heads, layer_idx, is_cross_attention=True)
        self.cross_attn_layer_norm = nn.LayerNorm(config.d_model)
        self.cross_attn_mid_layer_norm = mid_layer_norm(config)

    def forward(
        self,
        hidden_states,
        self_bias,
        encoder_hidden_states,
        cross_bias,
        cache=None,
        prefix=None,
        output_attentions=False,
        rows=None,
    ):
        """(B, T, d) -> (B, T, d), self- and cross-attention weights or None.

        `rows` (B, K): only these positions' outputs are wanted (B, K, d); their queries attend to the keys and
        values of every position, and nothing else is computed for the others (the last layer in training).
        """
        normed = self.self_attn_layer_norm(hidden_states)
        queries, key_states = normed, None
        if rows is not None:
            hidden_states, queries = take_rows(hidden_states, rows), take_rows(normed, rows)
            key_states = in_matmul_dtype(normed)  # every position, cast once for the key and the value projection
            self_bias, cross_bias = take_bias_rows(self_bias, rows), take_bias_rows(cross_bias, rows)
        h, self_weights = self.self_attn(
            queries,
            self_bias,
            key_value_states=key_states,
            cache=cache,
            prefix=prefix,
            output_attentions=output_attentions,
        )
        hidden_states = self.residual(hidden_states, self.self_attn_mid_layer_norm(h))
        h, cross_weights = self.cross_attn(
            self.cross_attn_layer_norm(hidden_states),
            cross_bias,
            key_value_states=encoder_hidden_states,
            cache=cache,
            output_attentions=output_attentions,
        )
        hidden_states = self.residual(hidden_states, self.cross_attn_mid_layer_norm(h))
        return self.feed_forward(hidden_states), self_weights, cross_weights


def layer_prefixes(prefix_key_values: dict | None, side: str, num_layers: int) -> list:
    """The per-layer (key, value) prefixes of one side, or Nones."""
    prefixes = (prefix_key_values or {}).get(side)
    if prefixes is None:
        return [None] * num_layers
    if len(prefixes) != num_layers:
        raise ValueError(f"prefix_key_values[{side!r}] has {len(prefixes)} entries for {num_layers} layers")
    return list(prefixes)


# ----------------------------------------------------------------------------------------------------------------
# Encoder and decoder
# ----------------------------------------------------------------------------------------------------------------


class BiomedGPTPreTrainedModel(PreTrainedModel):
    """Weight init and transformers integration flags shared by the BiomedGPT models."""

    config_class = BiomedGPTConfig
    config: BiomedGPTConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["BiomedGPTEncoderLayer", "BiomedGPTDecoderLayer", "ResNet"]
    _skip_keys_device_placement = ["cache"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        """Normal(0, init_std) for linear/embedding, zero relative tables, Kaiming for convs, unit norms."""
        std = self.config.init_std
        if isinstance(module, RelativePositionTable):
            init.zeros_(module.weight)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized", False):
                init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            if isinstance(module, nn.BatchNorm2d):
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
                init.zeros_(module.num_batches_tracked)
        elif isinstance(module, BiomedGPTAttention) and module.c_attn is not None:
            init.ones_(module.c_attn)


@dataclass
class BiomedGPTEncoderOutput(ModelOutput):
    """Encoder output plus what the decoder's cross-attention needs (all batch-first, so generation can expand it)."""

    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    # (B, S) bool, True = real token, over the full [image; text] sequence.
    attention_mask: torch.Tensor | None = None
    # (1, S, d) layer-normalised absolute position embeddings of [image; text]; every sample shares the layout, so
    # one row serves the batch (generation may repeat it; the decoder reads row 0).
    position_embeddings: torch.Tensor | None = None


class BiomedGPTEncoder(nn.Module):
    """Embeds image patches and text, then runs the encoder layers with shared position bias."""

    def __init__(self, config: BiomedGPTConfig, embed_tokens: nn.Embedding):
        super().__init__()
        self.config = config
        d, heads = config.d_model, config.encoder_attention_heads
        self.num_heads = heads
        self.embed_tokens = embed_tokens
        self.type_embedding = nn.Embedding(2, d)
        self.layernorm_embedding = nn.LayerNorm(d)
        self.embed_images = ResNet(config.resnet_layers, config.resnet_width, config.resnet_drop_path_rate)
        self.image_proj = nn.Linear(config.resnet_out_channels, d)
        self.patch_layernorm_embedding = nn.LayerNorm(d)
        self.dropout = Dropout(config.dropout)
        self.embed_positions = nn.Embedding(config.max_positions + 2, d)
        self.embed_image_positions = nn.Embedding(config.image_bucket_size**2 + 1, d)
        self.pos_ln = nn.LayerNorm(d)
        self.image_pos_ln = nn.LayerNorm(d)
        self.pos_scaling = (d / heads * config.attn_scale_factor) ** -0.5
        self.pos_q_linear = nn.Linear(d, d)
        self.pos_k_linear = nn.Linear(d, d)
        rates = linear_rates(config.encoder_drop_path_rate, config.encoder_layers)
        self.layers = nn.ModuleList(BiomedGPTEncoderLayer(config, i, rate) for i, rate in enumerate(rates))
        self.layer_norm = nn.LayerNorm(d)
        self.token_rel_pos_table_list = nn.ModuleList(
            RelativePositionTable(2 * config.token_bucket_size - 1, heads) for _ in range(config.encoder_layers)
        )
        self.image_rel_pos_table_list = nn.ModuleList(
            RelativePositionTable((2 * config.image_bucket_size - 1) ** 2 + 3, heads)
            for _ in range(config.encoder_layers)
        )

    def type_embed(self, type_id: int, device) -> torch.Tensor:
        """(1, 1, d) type embedding: 0 = text, 1 = image (a module call, so ZeRO-3 gathers the weight)."""
        return self.type_embedding(torch.full((1, 1), type_id, dtype=torch.long, device=device))

    def embed_text(self, input_ids, inputs_embeds) -> torch.Tensor:
        """Token embeddings (scale 1.0) + type 0 -> layernorm_embedding -> dropout, (B, L, d)."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        return self.dropout(self.layernorm_embedding(x + self.type_embed(0, x.device)))

    def embed_image(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) -> patch tokens (B, N, d) and their grid position ids (N,)."""
        features = self.embed_images(pixel_values)  # (B, C, H/16, W/16)
        height, width = features.shape[-2:]
        if max(height, width) > self.config.image_bucket_size:
            raise ValueError(
                f"image of {tuple(pixel_values.shape[-2:])} px gives a {height}x{width} grid, larger than "
                f"image_bucket_size {self.config.image_bucket_size}; resize to at most "
                f"{16 * self.config.image_bucket_size} px"
            )
        # channels-last features: (B, C, h, w) -> (B, N, C) is a view of contiguous memory
        x = self.image_proj(features.flatten(2).transpose(1, 2))  # (B, C, N) -> (B, N, C) -> (B, N, d)
        x = self.dropout(self.patch_layernorm_embedding(x + self.type_embed(1, x.device)))
        return x, image_grid_position_ids(height, width, self.config.image_bucket_size, pixel_values.device)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        patch_masks: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        prefix_key_values: dict | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        return_dict: bool = True,
    ) -> BiomedGPTEncoderOutput:
        """Encode [image patches; text]; text-only when `pixel_values` is None or `patch_masks` is False.

        Always returns a `BiomedGPTEncoderOutput`; `return_dict` is accepted because `generate()` passes it.
        """
        x = self.embed_text(input_ids, inputs_embeds)
        text_len = x.shape[1]
        device = x.device
        if attention_mask is not None:
            keep = attention_mask.bool()
        elif input_ids is not None:
            keep = input_ids.ne(self.config.pad_token_id)
        else:
            keep = torch.ones(x.shape[:2], dtype=torch.bool, device=device)
        text_positions = torch.arange(text_len, device=device)
        position_embeddings = self.pos_ln(self.embed_positions(text_positions))  # (L, d)
        buckets = token_relative_buckets(
            text_positions, text_positions, self.config.token_bucket_size, self.config.token_bucket_positions
        )
        image_buckets = None
        if pixel_values is not None:
            image, image_ids = self.embed_image(pixel_values.to(x.dtype))
            image_keep = torch.ones(image.shape[:2], dtype=torch.bool, device=device)
            if patch_masks is not None:
                image_keep = image_keep & patch_masks.bool()[:, None]
            x = torch.cat([image, x], dim=1)
            keep = torch.cat([image_keep, keep], dim=1)
            image_positions = self.image_pos_ln(self.embed_image_positions(image_ids))
            position_embeddings = torch.cat([image_positions, position_embeddings])
            image_buckets = image_relative_buckets(image_ids, image_ids, self.config.image_bucket_size)
        x = x * keep.unsqueeze(-1).to(x.dtype)  # padded and image-less slots start at zero, as in OFA
        position_embeddings = position_embeddings.unsqueeze(0)  # (1, S, d): identical for every sample
        position_bias = absolute_position_bias(
            position_heads(self.pos_q_linear, position_embeddings, self.num_heads),
            position_heads(self.pos_k_linear, position_embeddings, self.num_heads),
            self.pos_scaling,
        )  # (1, H, S, S)
        if not all_kept(keep):  # without padding the bias stays (1, H, S, S) and broadcasts over the batch
            position_bias = position_bias + additive_mask(keep[:, None, None, :], position_bias.dtype)  # (B, H, S, S)
        prefixes = layer_prefixes(prefix_key_values, "encoder", len(self.layers))
        hidden_states, attentions = (x,) if output_hidden_states else None, () if output_attentions else None
        for i, layer in enumerate(self.layers):
            image_bias = None if image_buckets is None else self.image_rel_pos_table_list[i](image_buckets)
            bias = add_block_diagonal(position_bias, image_bias, self.token_rel_pos_table_list[i](buckets))
            x, weights = layer(x, bias, prefix=prefixes[i], output_attentions=output_attentions)
            if output_hidden_states:
                hidden_states += (x,)
            if output_attentions:
                attentions += (weights,)
        return BiomedGPTEncoderOutput(
            last_hidden_state=self.layer_norm(x),
            hidden_states=hidden_states,
            attentions=attentions,
            attention_mask=keep,
            position_embeddings=position_embeddings,
        )


@dataclass
class BiomedGPTDecoderOutput(ModelOutput):
    """Decoder hidden states (before the output projection) and the cache."""

    last_hidden_state: torch.Tensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    cross_attentions: tuple[torch.Tensor, ...] | None = None


class BiomedGPTDecoder(nn.Module):
    """Causal decoder with self/cross absolute position bias and per-layer token relative bias."""

    def __init__(self, config: BiomedGPTConfig, embed_tokens: nn.Embedding):
        super().__init__()
        self.config = config
        d, heads = config.d_model, config.decoder_attention_heads
        self.num_heads = heads
        self.embed_tokens = embed_tokens
        self.layernorm_embedding = nn.LayerNorm(d)
        self.code_layernorm_embedding = nn.LayerNorm(d)
        self.dropout = Dropout(config.dropout)
        self.embed_positions = nn.Embedding(config.max_positions + 2, d)
        self.embed_image_positions = nn.Embedding(config.image_bucket_size**2 + 1, d)
        self.pos_ln = nn.LayerNorm(d)
        self.image_pos_ln = nn.LayerNorm(d)
        self.pos_scaling = (d / heads * config.attn_scale_factor) ** -0.5
        self.self_pos_q_linear = nn.Linear(d, d)
        self.self_pos_k_linear = nn.Linear(d, d)
        self.cross_pos_q_linear = nn.Linear(d, d)
        self.cross_pos_k_linear = nn.Linear(d, d)
        rates = linear_rates(config.decoder_drop_path_rate, config.decoder_layers)
        self.layers = nn.ModuleList(BiomedGPTDecoderLayer(config, i, rate) for i, rate in enumerate(rates))
        self.layer_norm = nn.LayerNorm(d)
        self.output_projection = nn.Linear(d, config.vocab_size, bias=False)
        self.token_rel_pos_table_list = nn.ModuleList(
            RelativePositionTable(2 * config.token_bucket_size - 1, heads) for _ in range(config.decoder_layers)
        )
        self.image_rel_pos_table_list = nn.ModuleList(
            RelativePositionTable((2 * config.image_bucket_size - 1) ** 2 + 3, heads)
            for _ in range(config.decoder_layers)
        )

    def self_attention_mask(self, query_positions, key_positions, attention_mask, dtype) -> torch.Tensor:
        """Causal mask, plus key padding from `attention_mask` (B, past + T) when given: (1 or B, 1, T, S)."""
        keep = (key_positions[None, :] <= query_positions[:, None])[None, None]  # (1, 1, T, S)
        if attention_mask is not None:
            if attention_mask.shape[-1] < key_positions.numel():  # mask given for this step only
                attention_mask = F.pad(attention_mask, (key_positions.numel() - attention_mask.shape[-1], 0), value=1)
            keep = keep & attention_mask.bool()[:, None, None, :]
        return additive_mask(keep, dtype)

    def embed(self, input_ids, inputs_embeds, code_masks) -> torch.Tensor:
        """Token embeddings -> layernorm_embedding (code_layernorm_embedding for image-code samples) -> dropout."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if code_masks is None:
            return self.dropout(self.layernorm_embedding(x))
        code = code_masks.bool()[:, None, None]
        return self.dropout(torch.where(code, self.code_layernorm_embedding(x), self.layernorm_embedding(x)))

    def position_embeddings(self, key_positions: torch.Tensor, code_masks) -> torch.Tensor:
        """Normalised absolute positions of the decoder steps: (1, S, d), or (B, S, d) with image-code samples."""
        positions = self.pos_ln(self.embed_positions(key_positions)).unsqueeze(0)
        if code_masks is None:
            return positions
        ids = code_position_ids(
            key_positions.numel(), self.config.code_image_size, self.config.image_bucket_size, key_positions.device
        )
        code_positions = self.image_pos_ln(self.embed_image_positions(ids)).unsqueeze(0)
        return torch.where(code_masks.bool()[:, None, None], code_positions, positions)

    def cross_position_keys(self, encoder_outputs, input_dtype, dtype) -> torch.Tensor:
        """(1, H, S_enc, hd) projections of the encoder positions for the cross-attention bias. Without gradients
        they are kept on `encoder_outputs`, so the decoding steps of one generate() call compute them once."""
        keys = getattr(encoder_outputs, "cross_position_keys", None)
        if keys is None:
            positions = encoder_outputs.position_embeddings[:1].to(input_dtype)
            keys = position_heads(self.cross_pos_k_linear, positions, self.num_heads)
            if not torch.is_grad_enabled():
                encoder_outputs.cross_position_keys = keys  # an attribute, not a field: not part of the output
        return keys.to(dtype)

    def code_buckets(self, past: int, total: int, device) -> torch.Tensor:
        """2-D image relative buckets between the code steps [past, total) and [0, total)."""
        ids = code_position_ids(total, self.config.code_image_size, self.config.image_bucket_size, device)
        return image_relative_buckets(ids[past:], ids, self.config.image_bucket_size)

    def relative_bias(self, i: int, buckets, code_buckets, code_masks) -> torch.Tensor:
        """Layer i's relative bias: token buckets, or image buckets for image-code samples."""
        bias = self.token_rel_pos_table_list[i](buckets)  # (1, H, T, S)
        if code_masks is None:
            return bias
        code_bias = self.image_rel_pos_table_list[i](code_buckets)
        return torch.where(code_masks.bool()[:, None, None, None], code_bias, bias)  # (B, H, T, S)

    def forward(
        self,
        input_ids: torch.LongTensor | None,
        encoder_outputs: BiomedGPTEncoderOutput,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        prefix_key_values: dict | None = None,
        code_masks: torch.Tensor | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        output_rows: torch.Tensor | None = None,
    ) -> BiomedGPTDecoderOutput:
        """Decode the new tokens (B, T) given `cache` of the earlier ones.

        `output_rows` (B, K): the positions whose final states are wanted (training: the labelled ones); the last
        layer computes only those, and its states, weights and the output are (B, K, ...).
        """
        x = self.embed(input_ids, inputs_embeds, code_masks)
        length = x.shape[1]
        past = cache.get_seq_length() if cache is not None else 0
        if past + length > self.embed_positions.num_embeddings:
            raise ValueError(
                f"decoder sequence of {past + length} tokens exceeds the {self.embed_positions.num_embeddings} "
                "position embeddings; with the prompt in the decoder (prompt_type=prev_output) the prompt and the "
                "answer share them: lower data.max_src_len or data.max_tgt_len / eval.max_new_tokens"
            )
        key_positions = torch.arange(past + length, device=x.device)
        query_positions = key_positions[past:]
        positions = self.position_embeddings(key_positions, code_masks)  # (1 or B, past + T, d)
        query_pos = positions[:, past:]
        self_bias = absolute_position_bias(
            position_heads(self.self_pos_q_linear, query_pos, self.num_heads),
            position_heads(self.self_pos_k_linear, positions, self.num_heads),
            self.pos_scaling,
        )  # (1 or B, H, T, past + T)
        self_bias = self_bias + self.self_attention_mask(
            query_positions, key_positions, attention_mask, self_bias.dtype
        )
        cross_queries = position_heads(self.cross_pos_q_linear, query_pos, self.num_heads)
        cross_bias = absolute_position_bias(
            cross_queries, self.cross_position_keys(encoder_outputs, x.dtype, cross_queries.dtype), self.pos_scaling
        )  # (1 or B, H, T, S_enc)
        cross_bias = cross_bias + additive_mask(
            encoder_outputs.attention_mask[:, None, None, :].bool(), cross_bias.dtype
        )
        buckets = token_relative_buckets(
            query_positions, key_positions, self.config.token_bucket_size, self.config.token_bucket_positions
        )
        code_buckets = None if code_masks is None else self.code_buckets(past, past + length, x.device)
        prefixes = layer_prefixes(prefix_key_values, "decoder", len(self.layers))
        encoder_hidden_states = encoder_outputs.last_hidden_state
        if not cross_keys_cached(cache):  # cast once for every layer's k and v projection
            encoder_hidden_states = in_matmul_dtype(encoder_hidden_states)
        hidden_states = (x,) if output_hidden_states else None
        attentions = cross_attentions = () if output_attentions else None
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            bias = self_bias + self.relative_bias(i, buckets, code_buckets, code_masks).to(self_bias.dtype)
            x, self_weights, cross_weights = layer(
                x,
                bias,
                encoder_hidden_states,
                cross_bias,
                cache=cache,
                prefix=prefixes[i],
                output_attentions=output_attentions,
                rows=output_rows if i == last else None,
            )
            if output_hidden_states:
                hidden_states += (x,)
            if output_attentions:
                attentions += (self_weights,)
                cross_attentions += (cross_weights,)
        return BiomedGPTDecoderOutput(
            last_hidden_state=self.layer_norm(x),
            cache=cache,
            hidden_states=hidden_states,
            attentions=attentions,
            cross_attentions=cross_attentions,
        )


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


def shift_tokens_right(labels: torch.Tensor, pad_token_id: int, decoder_start_token_id: int) -> torch.Tensor:
    """Teacher-forcing decoder input: [start, labels[:-1]] with -100 replaced by pad."""
    shifted = labels.new_full(labels.shape, pad_token_id)
    shifted[:, 1:] = labels[:, :-1]
    shifted[:, 0] = decoder_start_token_id
    return shifted.masked_fill(shifted == -100, pad_token_id)


def as_encoder_output(encoder_outputs) -> BiomedGPTEncoderOutput:
    """Accept a `BiomedGPTEncoderOutput` or its tuple form."""
    if isinstance(encoder_outputs, BiomedGPTEncoderOutput):
        return encoder_outputs
    if isinstance(encoder_outputs, (tuple, list)):
        return BiomedGPTEncoderOutput(*encoder_outputs)
    return BiomedGPTEncoderOutput(**encoder_outputs)


class BiomedGPTModel(BiomedGPTPreTrainedModel):
    """Encoder + decoder sharing one token embedding."""

    _tied_weights_keys = {
        "decoder.embed_tokens.weight": "encoder.embed_tokens.weight",
        "decoder.output_projection.weight": "encoder.embed_tokens.weight",
    }

    def __init__(self, config: BiomedGPTConfig):
        super().__init__(config)
        embed_tokens = nn.Embedding(config.vocab_size, config.d_model, padding_idx=config.pad_token_id)
        self.encoder = BiomedGPTEncoder(config, embed_tokens)
        self.decoder = BiomedGPTDecoder(config, embed_tokens)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.encoder.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.encoder.embed_tokens = self.decoder.embed_tokens = value

    def get_encoder(self, modality: str | None = None) -> BiomedGPTEncoder:
        return self.encoder

    def get_decoder(self) -> BiomedGPTDecoder:
        return self.decoder

    @deprecate_kwarg("past_key_values", "6.0.0", new_name="cache")  # transformers >= 5.24 names the cache `cache`
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        pixel_values=None,
        patch_masks=None,
        decoder_input_ids=None,
        decoder_attention_mask=None,
        encoder_outputs=None,
        cache=None,
        use_cache=None,
        inputs_embeds=None,
        decoder_inputs_embeds=None,
        prefix_key_values=None,
        code_masks=None,
        output_attentions=None,
        output_hidden_states=None,
        decoder_output_rows=None,
    ) -> Seq2SeqModelOutput:
        """Encode (unless `encoder_outputs` is given) and decode; returns decoder hidden states (at
        `decoder_output_rows` (B, K) only, when given)."""
        output_attentions = bool(output_attentions)
        output_hidden_states = bool(output_hidden_states)
        use_cache = (self.config.use_cache and not self.training) if use_cache is None else use_cache
        if encoder_outputs is None:
            encoder_outputs = self.encoder(
                input_ids,
                attention_mask,
                pixel_values,
                patch_masks,
                inputs_embeds,
                prefix_key_values,
                output_attentions=output_attentions,
                output_hidden_states=output_hidden_states,
            )
        encoder_outputs = as_encoder_output(encoder_outputs)
        if use_cache and cache is None:
            cache = EncoderDecoderCache(DynamicCache(config=self.config), DynamicCache(config=self.config))
        if not use_cache:
            cache = None
        decoder_outputs = self.decoder(
            decoder_input_ids,
            encoder_outputs,
            decoder_attention_mask,
            cache,
            decoder_inputs_embeds,
            prefix_key_values,
            code_masks,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            output_rows=decoder_output_rows,
        )
        return Seq2SeqModelOutput(
            last_hidden_state=decoder_outputs.last_hidden_state,
            cache=decoder_outputs.cache,
            decoder_hidden_states=decoder_outputs.hidden_states,
            decoder_attentions=decoder_outputs.attentions,
            cross_attentions=decoder_outputs.cross_attentions,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.hidden_states,
            encoder_attentions=encoder_outputs.attentions,
        )


class BiomedGPTForConditionalGeneration(BiomedGPTPreTrainedModel, GenerationMixin):
    """BiomedGPT with the tied LM head, label-smoothed loss and `generate()`.

    Extra forward inputs beyond the usual seq2seq ones:
      pixel_values (B, 3, H, W) and patch_masks (B,) bool (False = this sample has no image);
      prefix_key_values {"encoder": [...], "decoder": [...]}: per layer a (key, value) pair of shape
      (B or 1, heads, P, head_dim), prepended to self-attention keys/values, always visible, with zero position bias
      and without shifting positions (prefix tuning / P-tuning v2);
      code_masks (B,) bool: the target of this sample is VQ-GAN image codes (OFA image infilling/generation), which
      switches its decoder to the image position tables and `code_layernorm_embedding`.
    """

    _tied_weights_keys = {
        "model.decoder.embed_tokens.weight": "model.encoder.embed_tokens.weight",
        "model.decoder.output_projection.weight": "model.encoder.embed_tokens.weight",
    }

    def __init__(self, config: BiomedGPTConfig):
        super().__init__(config)
        self.model = BiomedGPTModel(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.encoder.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Linear:
        return self.model.decoder.output_projection

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.model.decoder.output_projection = value

    def get_encoder(self, modality: str | None = None) -> BiomedGPTEncoder:
        return self.model.encoder

    def get_decoder(self) -> BiomedGPTDecoder:
        return self.model.decoder

    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor) -> torch.Tensor:
        return shift_tokens_right(labels, self.config.pad_token_id, self.config.decoder_start_token_id)

    def token_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the labelled tokens (-100 ignored), in float32, with the configured smoothing."""
        return F.cross_entropy(logits.float(), labels, ignore_index=-100, label_smoothing=self.config.label_smoothing)

    @deprecate_kwarg("past_key_values", "6.0.0", new_name="cache")  # transformers >= 5.24 names the cache `cache`
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        patch_masks: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        encoder_outputs: BiomedGPTEncoderOutput | tuple | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        prefix_key_values: dict | None = None,
        code_masks: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        return_logits: bool = True,
    ) -> Seq2SeqLMOutput | tuple:
        """Logits over the vocabulary for every decoder position; loss when `labels` (-100 = ignore) are given.

        `return_logits=False` (training) returns the loss without logits and computes the last decoder layer and the
        vocabulary projection for the labelled positions only: with the prompt in the decoder (prompt_type=
        prev_output) most positions carry no label. The last layer's states and weights then cover those rows.
        """
        rows = None
        if labels is not None:
            use_cache = False
            if decoder_input_ids is None and decoder_inputs_embeds is None:
                decoder_input_ids = self.prepare_decoder_input_ids_from_labels(labels)
            if not return_logits:
                rows = labelled_rows(labels)
                labels = labels if rows is None else labels.gather(1, rows)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            patch_masks=patch_masks,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            encoder_outputs=encoder_outputs,
            cache=cache,
            use_cache=use_cache,
            inputs_embeds=inputs_embeds,
            decoder_inputs_embeds=decoder_inputs_embeds,
            prefix_key_values=prefix_key_values,
            code_masks=code_masks,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            decoder_output_rows=rows,
        )
        hidden, logits, loss = outputs.last_hidden_state, None, None
        labels = labels.to(hidden.device) if labels is not None else None
        if labels is not None and not return_logits:
            supervised = labels != -100
            loss = self.token_loss(self.model.decoder.output_projection(hidden[supervised]), labels[supervised])
        else:
            logits = self.model.decoder.output_projection(hidden)
            if labels is not None:
                loss = self.token_loss(logits.flatten(0, 1), labels.flatten())  # (B*T, V), (B*T,)
        output = Seq2SeqLMOutput(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            decoder_hidden_states=outputs.decoder_hidden_states,
            decoder_attentions=outputs.decoder_attentions,
            cross_attentions=outputs.cross_attentions,
            encoder_last_hidden_state=outputs.encoder_last_hidden_state,
            encoder_hidden_states=outputs.encoder_hidden_states,
            encoder_attentions=outputs.encoder_attentions,
        )
        return output if return_dict is not False else output.to_tuple()
