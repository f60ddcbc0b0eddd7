"""``attention(q, k, v)``: one scaled-dot-product attention with interchangeable backends.

Tensors are (batch, heads, seq, head_dim); keys and values may be longer or shorter than the queries.
Masks follow ``torch.nn.functional.scaled_dot_product_attention``: a boolean mask is True where a query may
attend, a float mask is added to the scores, both broadcast to (batch, heads, q_len, k_len); ``is_causal``
lets query i see keys 0..i (top-left aligned, also when q_len != k_len). A query row that may attend to no key
returns zeros, as SDPA does.

Backends:
- ``xformers``: ``xformers.ops.memory_efficient_attention`` (CUDA tensors only).
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``.
- ``chunked``: plain PyTorch over blocks of queries, so the scores held at once stay under the memory cap
  (``set_max_attention_bytes``); under autograd each block is recomputed in backward (activation checkpointing)
  so backward memory stays bounded too.
- ``math``: the reference softmax(q k^T * scale + mask) v, in float32 for float16/bfloat16 inputs.
- ``auto``: see ``auto_backend``.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from types import ModuleType

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend
from torch.utils.checkpoint import checkpoint

from vlkd.errors import BackendUnavailableError

BACKENDS = ("auto", "xformers", "sdpa", "chunked", "math")
DEFAULT_MAX_ATTENTION_BYTES = 1 << 30
MAX_ATTENTION_BYTES_ENV = "VLKD_MAX_ATTENTION_BYTES"

_XFORMERS_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOW_PRECISION = (torch.float16, torch.bfloat16)
# The float32 scores and probabilities one block of the chunked backend holds at once.
_BYTES_PER_SCORE = 2 * 4

_max_attention_bytes: int | None = None


def set_max_attention_bytes(n: int) -> None:
    """Set the score-matrix bytes above which ``auto`` avoids materialising it; also ``chunked``'s block budget."""
    global _max_attention_bytes
    if int(n) <= 0:
        raise BackendUnavailableError(f"max attention bytes must be a positive byte count, got {n!r}")
    _max_attention_bytes = int(n)


def get_max_attention_bytes() -> int:
    """The memory cap in bytes: the last ``set_max_attention_bytes``, else ``$VLKD_MAX_ATTENTION_BYTES``, else 1 GiB."""
    if _max_attention_bytes is None:
        raw = os.environ.get(MAX_ATTENTION_BYTES_ENV, str(DEFAULT_MAX_ATTENTION_BYTES))
        try:
            set_max_attention_bytes(int(raw))
        except (ValueError, BackendUnavailableError):
            raise BackendUnavailableError(
                f"{MAX_ATTENTION_BYTES_ENV}={raw!r} is not a positive integer; "
                "set it to a byte count such as 1073741824"
            ) from None
    return _max_attention_bytes


def check_backend(backend: str) -> None:
    """Raise ``BackendUnavailableError`` unless ``backend`` is a known name whose library is installed."""
    if backend not in BACKENDS:
        raise _unknown_backend_error(backend)
    if backend == "xformers" and _xformers_ops() is None:
        raise BackendUnavailableError(
            "attention backend 'xformers' needs the xformers package, which is not installed; "
            "pip install 'vlkd[xformers]' or use backend='sdpa'"
        )


def _unknown_backend_error(backend: object) -> BackendUnavailableError:
    return BackendUnavailableError(f"unknown attention backend {backend!r}; use one of {', '.join(BACKENDS)}")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Scaled dot-product attention of (B, H, Lq, D) queries over (B, H, Lk, D) keys/values with ``backend``.

    ``scale`` defaults to head_dim ** -0.5; ``dropout_p`` drops attention probabilities (pass 0 in eval).
    """
    run = _BACKEND_FUNCTIONS.get(backend)
    if run is None:
        raise _unknown_backend_error(backend)
    return run(q, k, v, attn_mask, is_causal, scale, dropout_p)


def auto_backend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> str:
    """The backend ``auto`` tries first for these inputs: "xformers", "sdpa" or "chunked".

    xformers for CUDA tensors when it is installed (``auto`` falls back to the next rule when xformers has no
    kernel for the inputs). Else SDPA, unless SDPA would materialise a score matrix larger than the cap: then
    ``chunked``. SDPA "materialises" when it dispatches to its math kernel; we ask torch's own dispatcher
    (``torch._fused_sdp_choice``), and only when batch*heads*q_len*k_len*4 bytes exceed the cap, so the common
    case costs one multiplication. Evidence (torch 2.14.1, CPU, 2 threads, batch 1, 8 heads, head_dim 64,
    seq 4,096 whose float32 score matrix is 512 MiB; extra peak RSS of one SDPA forward in a fresh process):
    plain 12 MB, boolean (L, L) mask 61 MB (the mask as float), float key mask 13 MB, causal 12 MB,
    float16 4 MB, bfloat16 12 MB, head_dim 80 14 MB, inputs requiring grad 12 MB, forward+backward 50 MB,
    boolean mask + backward 100 MB: torch's CPU flash kernel covers all of these. But dropout_p=0.1 1,553 MB,
    value head_dim != query head_dim 1,168 MB, and a float mask that requires grad (a learned bias) 1,598 MB
    with backward: these run torch's math kernel, and are what ``auto`` sends to ``chunked``. On CUDA the
    dispatcher also reports math for inputs no fused kernel takes (e.g. some dtypes and head dims).
    ``chunked``'s checkpointing measured on the same case, forward+backward, 64 MiB cap: 331 MB with it,
    612 MB without (math 1,579 MB), for about 1.5x the time of the unchecked loop.
    """
    if q.is_cuda and _xformers_ops() is not None and _xformers_key(q, v, attn_mask, is_causal) not in _XFORMERS_REFUSED:
        return "xformers"
    return "chunked" if _sdpa_materialises_over_cap(q, k, v, attn_mask, is_causal, scale, dropout_p) else "sdpa"


def _sdpa_materialises_over_cap(q, k, v, attn_mask, is_causal, scale, dropout_p) -> bool:
    if math.prod(q.shape[:-1]) * k.shape[-2] * 4 <= get_max_attention_bytes():
        return False
    sdpa_mask, sdpa_causal = _sdpa_mask(attn_mask, is_causal, q, k)
    choice = torch._fused_sdp_choice(
        q, k, v, attn_mask=sdpa_mask, dropout_p=dropout_p, is_causal=sdpa_causal, scale=scale
    )
    return choice in (SDPBackend.MATH.value, SDPBackend.ERROR.value)


# Input kinds xformers refused once (no kernel, or its C++ extensions did not load for this torch): ``auto``
# goes straight to SDPA for them. Without this, each call paid for xformers' failed dispatch; measured on an
# H200 with xformers 0.0.35 built for another torch: 0.22 ms per call against SDPA's 0.04 ms.
_XFORMERS_REFUSED: set[tuple] = set()


def _xformers_key(q, v, attn_mask, is_causal) -> tuple:
    return (q.device, q.dtype, q.shape[-1], v.shape[-1], attn_mask is not None, is_causal)


def _auto_attention(q, k, v, attn_mask, is_causal, scale, dropout_p):
    """See ``auto_backend``."""
    if q.is_cuda and _xformers_ops() is not None:
        key = _xformers_key(q, v, attn_mask, is_causal)
        if key not in _XFORMERS_REFUSED:
            try:
                return _xformers_attention(q, k, v, attn_mask, is_causal, scale, dropout_p)
            except BackendUnavailableError:
                _XFORMERS_REFUSED.add(key)
    if _sdpa_materialises_over_cap(q, k, v, attn_mask, is_causal, scale, dropout_p):
        return _chunked_attention(q, k, v, attn_mask, is_causal, scale, dropout_p)
    return _sdpa_attention(q, k, v, attn_mask, is_causal, scale, dropout_p)


def _sdpa_mask(attn_mask, is_causal, q, k):
    """The (mask, is_causal) pair SDPA accepts: it refuses both at once, so causality is folded into the mask."""
    if attn_mask is None or not is_causal:
        if attn_mask is not None and attn_mask.dtype != torch.bool and attn_mask.dtype != q.dtype:
            attn_mask = attn_mask.to(q.dtype)
        return attn_mask, is_causal
    allowed = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    if attn_mask.dtype == torch.bool:
        return attn_mask & allowed, False
    return attn_mask.to(q.dtype).masked_fill(~allowed, float("-inf")), False


def _sdpa_attention(q, k, v, attn_mask, is_causal, scale, dropout_p):
    attn_mask, is_causal = _sdpa_mask(attn_mask, is_causal, q, k)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale
    )


def _attend(q, k, v, attn_mask, is_causal, scale, dropout_p, first_row):
    """softmax(q k^T * scale + mask) v for a block of query rows starting at ``first_row`` (for causality)."""
    scores = torch.matmul(q * scale, k.transpose(-2, -1))
    if is_causal:
        allowed = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril(first_row)
        scores.masked_fill_(~allowed, float("-inf"))
    dead_rows = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores.masked_fill_(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask  # broadcasting may grow scores, so not in place
        # Rows that may attend nowhere would softmax to NaN (and NaN gradients); SDPA returns zeros for them.
        dead_rows = scores.amax(dim=-1, keepdim=True) == float("-inf")
        if dead_rows.any():
            scores = scores.masked_fill(dead_rows, 0.0)
        else:
            dead_rows = None
    probs = torch.softmax(scores, dim=-1)
    if dead_rows is not None:
        probs = probs.masked_fill(dead_rows, 0.0)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, v)


def _math_attention(q, k, v, attn_mask, is_causal, scale, dropout_p):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if q.dtype in _LOW_PRECISION:
        out = _attend(q.float(), k.float(), v.float(), _float32_mask(attn_mask), is_causal, scale, dropout_p, 0)
        return out.to(q.dtype)
    return _attend(q, k, v, attn_mask, is_causal, scale, dropout_p, 0)


def _float32_mask(attn_mask):
    if attn_mask is None or attn_mask.dtype == torch.bool:
        return attn_mask
    return attn_mask.float()


def _chunked_attention(q, k, v, attn_mask, is_causal, scale, dropout_p):
    """Attention over blocks of query rows sized so one block's float32 scores + probabilities fit the cap."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out_dtype = q.dtype
    if q.dtype in _LOW_PRECISION:
        # Keys and values are upcast once (O(seq x head_dim)); query blocks are upcast one at a time.
        k, v, attn_mask = k.float(), v.float(), _float32_mask(attn_mask)
    q_len, k_len = q.shape[-2], k.shape[-2]
    score_bytes_per_row = math.prod(q.shape[:-2]) * k_len * _BYTES_PER_SCORE
    rows = max(1, min(q_len, get_max_attention_bytes() // max(1, score_bytes_per_row)))
    mask_has_rows = attn_mask is not None and attn_mask.dim() >= 2 and attn_mask.shape[-2] != 1
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, attn_mask))
    blocks = []
    for first in range(0, q_len, rows):
        q_rows = q[..., first : first + rows, :].to(k.dtype)
        mask_rows = attn_mask[..., first : first + rows, :] if mask_has_rows else attn_mask
        args = (q_rows, k, v, mask_rows, is_causal, scale, dropout_p, first)
        # Without checkpointing, autograd would keep every block's probabilities: O(q_len x k_len) again.
        blocks.append(checkpoint(_attend, *args, use_reentrant=False) if needs_grad else _attend(*args))
    return torch.cat(blocks, dim=-2).to(out_dtype)


@functools.cache
def _xformers_ops() -> ModuleType | None:
    try:
        import xformers.ops
    except ImportError:
        return None
    return xformers.ops


def _xformers_attention(q, k, v, attn_mask, is_causal, scale, dropout_p):
    xops = _xformers_ops()
    if xops is None:
        check_backend("xformers")
    if not q.is_cuda:
        raise BackendUnavailableError(
            f"attention backend 'xformers' needs CUDA tensors, got {q.device.type} tensors; "
            "use backend='sdpa' or 'chunked'"
        )
    if q.dtype not in _XFORMERS_DTYPES:
        raise BackendUnavailableError(
            f"attention backend 'xformers' does not take {q.dtype}; use float16, bfloat16 or float32, or backend='sdpa'"
        )
    bias = None
    if attn_mask is not None:
        bias = _xformers_bias(attn_mask, is_causal, q, k)
    elif is_causal:
        bias = xops.LowerTriangularMask()  # query i sees keys 0..i: SDPA's top-left alignment
    try:
        # xformers wants (batch, seq, heads, head_dim); the transposes are views, no copies.
        out = xops.memory_efficient_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias, p=dropout_p, scale=scale
        )
    except NotImplementedError as err:
        reason = str(err).strip().splitlines()[0]
        raise BackendUnavailableError(
            f"xformers has no kernel for {q.dtype} head_dim {q.shape[-1]} on {q.device}: {reason}; use backend='sdpa'"
        ) from err
    return out.transpose(1, 2)


def _xformers_bias(attn_mask, is_causal, q, k):
    """An additive bias in q's dtype, broadcast (not copied) to (B, H, Lq, Lk) on storage whose rows start at
    multiples of 8 elements, the alignment xformers' kernels require."""
    mask, _ = _sdpa_mask(attn_mask, is_causal, q, k)
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    k_len = k.shape[-2]
    padded = torch.empty(*mask.shape[:-1], -(-k_len // 8) * 8, dtype=q.dtype, device=q.device)
    bias = padded[..., :k_len]
    bias.copy_(mask.expand(bias.shape))
    return bias.expand(q.shape[0], q.shape[1], q.shape[2], k_len)


_BACKEND_FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "auto": _auto_attention,
    "xformers": _xformers_attention,
    "sdpa": _sdpa_attention,
    "chunked": _chunked_attention,
    "math": _math_attention,
}
