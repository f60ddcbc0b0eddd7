"""Route the attention of diffusers, open_clip and transformers models through ``vlkd.kernels.attention``.

Models keep their modules, parameters and state_dict keys; only how attention is computed changes, and
``restore_attention`` puts the original computation back:
- diffusers ``Attention`` layers get a ``VlkdAttnProcessor`` (their original processor is kept inside it);
- ``torch.nn.MultiheadAttention`` (open_clip's default blocks) and open_clip's own ``Attention`` get an
  instance-level ``forward`` (so ``copy.deepcopy`` and ``state_dict`` keep working; pickle the whole module only
  after ``restore_attention``);
- transformers models get a registered attention implementation ``vlkd_<backend>`` (AttentionInterface) that
  takes SDPA-style masks, set with ``set_attn_implementation``.
A library is only looked at when it has been imported, since a model built with it implies it was.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from vlkd.errors import BackendUnavailableError
from vlkd.kernels.attention import BACKENDS, attention, check_backend

_BACKEND_ATTR = "_vlkd_attention_backend"
_ORIGINAL_IMPLEMENTATION_ATTR = "_vlkd_original_attn_implementation"
_TRANSFORMERS_PREFIX = "vlkd_"


def use_attention(model: nn.Module, backend: str = "auto", *, strict: bool = True) -> int:
    """Make every attention layer of ``model`` that vlkd knows call ``vlkd.kernels.attention(backend=backend)``.

    Returns how many layers changed; with ``strict`` a model without any is an error. Calling it again
    switches the backend; ``restore_attention`` undoes it.
    """
    check_backend(backend)
    found = _use_in_diffusers(model, backend) + _use_in_torch_and_open_clip(model, backend)
    found += _use_in_transformers(model, backend)
    if found == 0 and strict:
        raise BackendUnavailableError(
            f"{type(model).__name__} has no attention layer vlkd can replace (diffusers Attention, "
            "torch MultiheadAttention, open_clip Attention, transformers AttentionInterface models)"
        )
    return found


def restore_attention(model: nn.Module) -> None:
    """Give every layer changed by ``use_attention`` its original attention computation back (no-op if none)."""
    for module in model.modules():
        processor = getattr(module, "processor", None)
        if isinstance(processor, VlkdAttnProcessor):
            module.set_processor(processor.original)
        if _BACKEND_ATTR in module.__dict__:
            del module.forward
            delattr(module, _BACKEND_ATTR)
        if _ORIGINAL_IMPLEMENTATION_ATTR in module.__dict__:
            module.set_attn_implementation(module.__dict__[_ORIGINAL_IMPLEMENTATION_ATTR])
            delattr(module, _ORIGINAL_IMPLEMENTATION_ATTR)


def installed_backend(model: nn.Module) -> str | None:
    """The backend ``use_attention`` installed in ``model``, or None when it runs its own attention."""
    for module in model.modules():
        processor = getattr(module, "processor", None)
        if isinstance(processor, VlkdAttnProcessor):
            return processor.backend
        if _BACKEND_ATTR in module.__dict__:
            return module.__dict__[_BACKEND_ATTR]
        if _ORIGINAL_IMPLEMENTATION_ATTR in module.__dict__:
            return module.config._attn_implementation.removeprefix(_TRANSFORMERS_PREFIX)
    return None


@contextmanager
def attention_backend(model: nn.Module, backend: str) -> Iterator[nn.Module]:
    """Use ``backend`` inside the ``with`` block, then go back to what ``model`` used before."""
    previous = installed_backend(model)
    use_attention(model, backend)
    try:
        yield model
    finally:
        if previous is None:
            restore_attention(model)
        else:
            use_attention(model, previous)


# --- diffusers ---------------------------------------------------------------------------------------------


class VlkdAttnProcessor:
    """A diffusers attention processor computing what ``AttnProcessor2_0`` computes, through vlkd's attention."""

    def __init__(self, backend: str, original: object) -> None:
        self.backend = backend
        self.original = original

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: object,
        **kwargs: object,
    ) -> torch.Tensor:
        # The extra arguments are diffusers' deprecated per-call ``scale``, which its processors ignore too.
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch_size, sequence_length, _ = context.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = attention(query, key, value, attn_mask=attention_mask, scale=attn.scale, backend=self.backend)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _use_in_diffusers(model: nn.Module, backend: str) -> int:
    if "diffusers" not in sys.modules:
        return 0
    from diffusers.models.attention_processor import (
        Attention,
        AttnProcessor,
        AttnProcessor2_0,
        XFormersAttnProcessor,
    )

    # Only processors that compute plain attention are replaced: the others (added KV, IP-Adapter, LoRA,
    # joint attention, ...) compute more than VlkdAttnProcessor does and are left as they are.
    plain = (AttnProcessor, AttnProcessor2_0, XFormersAttnProcessor)
    found = 0
    for module in model.modules():
        if not isinstance(module, Attention):
            continue
        processor = module.get_processor()
        if isinstance(processor, VlkdAttnProcessor):
            processor.backend = backend
        elif type(processor) in plain:
            module.set_processor(VlkdAttnProcessor(backend, processor))
        else:
            continue
        found += 1
    return found


# --- torch.nn.MultiheadAttention and open_clip -------------------------------------------------------------


def _use_in_torch_and_open_clip(model: nn.Module, backend: str) -> int:
    forwards: dict[type, types.FunctionType] = {nn.MultiheadAttention: _multihead_attention_forward}
    if "open_clip" in sys.modules:
        from open_clip.transformer import Attention as OpenClipAttention

        forwards[OpenClipAttention] = _open_clip_attention_forward
    found = 0
    for module in model.modules():
        forward = forwards.get(type(module))
        if forward is None:
            continue
        setattr(module, _BACKEND_ATTR, backend)
        module.forward = types.MethodType(forward, module)
        found += 1
    return found


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A mask in torch's MultiheadAttention convention (bool True = blocked) as an additive float mask."""
    if mask.dtype != torch.bool:
        return mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))


def _multihead_attention_forward(
    self: nn.MultiheadAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    need_weights: bool = True,
    attn_mask: torch.Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``nn.MultiheadAttention.forward`` through vlkd's attention, for the calls that need no attention weights."""
    if need_weights or query.dim() != 3 or self.bias_k is not None or self.add_zero_attn:
        # Weights, unbatched inputs and learned extra keys have no counterpart here: torch computes those.
        return nn.MultiheadAttention.forward(
            self, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
        )
    if not self.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    batch, q_len, embed_dim = query.shape
    heads = self.num_heads
    if self._qkv_same_embed_dim and query is key and key is value:
        q, k, v = F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
    else:
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q, b_k, b_v = (None,) * 3 if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
        q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
    q, k, v = (t.view(batch, t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))

    # As torch does: is_causal is a hint that attn_mask is causal, usable only when nothing else is masked.
    use_causal = is_causal and key_padding_mask is None
    mask = None
    if attn_mask is not None and not use_causal:
        mask = _additive(attn_mask, q.dtype)
        if mask.dim() == 3:
            mask = mask.view(batch, heads, q_len, -1)
    if key_padding_mask is not None:
        padding = _additive(key_padding_mask, q.dtype).view(batch, 1, 1, -1)
        mask = padding if mask is None else mask + padding
    out = attention(
        q,
        k,
        v,
        attn_mask=mask,
        is_causal=use_causal,
        dropout_p=self.dropout if self.training else 0.0,
        backend=getattr(self, _BACKEND_ATTR),
    )
    out = F.linear(out.transpose(1, 2).reshape(batch, q_len, embed_dim), self.out_proj.weight, self.out_proj.bias)
    return (out if self.batch_first else out.transpose(0, 1)), None


def _open_clip_attention_forward(self: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None = None):
    """open_clip ``Attention.forward`` (qk-norm, head scale, inner norm) through vlkd's attention."""
    if self.logit_scale is not None:
        # Scaled-cosine attention scales each head by a learned factor: open_clip computes it itself.
        return type(self).forward(self, x, attn_mask)
    batch, length, channels = x.shape
    q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(batch, length, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
    if attn_mask is not None:
        if attn_mask.ndim == 3:
            attn_mask = attn_mask.reshape(batch, self.num_heads, length, length)
        attn_mask = _additive(attn_mask, q.dtype)
    x = attention(
        self.ln_q(q),
        self.ln_k(k),
        v,
        attn_mask=attn_mask,
        dropout_p=self.attn_drop.p if self.training else 0.0,
        backend=getattr(self, _BACKEND_ATTR),
    )
    if self.head_scale is not None:
        x = x * self.head_scale
    x = self.ln_inner(x.transpose(1, 2).reshape(batch, length, channels))
    return self.out_drop(self.out_proj(x))


# --- transformers ------------------------------------------------------------------------------------------


def _use_in_transformers(model: nn.Module, backend: str) -> int:
    if "transformers" not in sys.modules:
        return 0
    from transformers import PreTrainedModel

    _register_transformers_implementations()
    found = 0
    handled_configs: set[int] = set()
    for module in model.modules():
        if not isinstance(module, PreTrainedModel) or id(module.config) in handled_configs:
            continue
        if not module._can_set_attn_implementation():
            continue
        if _ORIGINAL_IMPLEMENTATION_ATTR not in module.__dict__:
            setattr(module, _ORIGINAL_IMPLEMENTATION_ATTR, _implementation_tree(module.config))
        # set_attn_implementation also sets the sub-models and sub-configs (e.g. CLIPModel's two towers).
        module.set_attn_implementation(_TRANSFORMERS_PREFIX + backend)
        handled_configs.update(id(m.config) for m in module.modules() if isinstance(m, PreTrainedModel))
        found += 1
    return found


def _implementation_tree(config: object) -> str | dict:
    """A config's attention implementation with its sub-configs', in ``set_attn_implementation``'s dict form."""
    subconfigs = {key: getattr(config, key) for key in config.sub_configs if getattr(config, key) is not None}
    if not subconfigs:
        return config._attn_implementation
    tree = {key: _implementation_tree(sub) for key, sub in subconfigs.items()}
    tree[""] = config._attn_implementation
    return tree


def _register_transformers_implementations() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    for backend in BACKENDS:
        name = _TRANSFORMERS_PREFIX + backend
        AttentionInterface.register(name, _transformers_attention_function(backend))
        # Our function takes masks as SDPA does (boolean, True = attend, or None plus is_causal).
        AttentionMaskInterface.register(name, sdpa_mask)


def _transformers_attention_function(backend: str):
    def vlkd_attention_forward(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        is_causal: bool | None = None,
        **kwargs: object,
    ) -> tuple[torch.Tensor, None]:
        """transformers' ``sdpa_attention_forward`` contract: (B, H, L, D) in, (B, L, H, D) out, no weights."""
        groups = getattr(module, "num_key_value_groups", 1)
        if groups > 1:
            key = key.repeat_interleave(groups, dim=1)
            value = value.repeat_interleave(groups, dim=1)
        is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        # As transformers' SDPA path: a given mask already holds causality, and one query needs none.
        is_causal = query.shape[2] > 1 and attention_mask is None and bool(is_causal)
        out = attention(
            query,
            key,
            value,
            attn_mask=attention_mask,
            is_causal=is_causal,
            scale=scaling,
            dropout_p=dropout,
            backend=backend,
        )
        return out.transpose(1, 2).contiguous(), None

    return vlkd_attention_forward
