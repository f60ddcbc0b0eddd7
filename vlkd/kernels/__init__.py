"""Shared attention: one ``attention(q, k, v)`` with backends, and installers that route models' attention to it."""

from vlkd.kernels.attention import (
    BACKENDS,
    attention,
    auto_backend,
    check_backend,
    get_max_attention_bytes,
    set_max_attention_bytes,
)
from vlkd.kernels.install import (
    VlkdAttnProcessor,
    attention_backend,
    installed_backend,
    restore_attention,
    use_attention,
)

__all__ = [
    "BACKENDS",
    "VlkdAttnProcessor",
    "attention",
    "attention_backend",
    "auto_backend",
    "check_backend",
    "get_max_attention_bytes",
    "installed_backend",
    "restore_attention",
    "set_max_attention_bytes",
    "use_attention",
]
