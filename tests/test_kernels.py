"""vlkd.kernels: every backend equals the math reference, and installing it leaves models' outputs unchanged."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch

from vlkd.errors import BackendUnavailableError
from vlkd.kernels import (
    attention,
    attention_backend,
    auto_backend,
    get_max_attention_bytes,
    installed_backend,
    restore_attention,
    set_max_attention_bytes,
    use_attention,
)

# The package re-exports the function ``attention``, which shadows its submodule of the same name.
attention_module = importlib.import_module("vlkd.kernels.attention")
install_module = importlib.import_module("vlkd.kernels.install")

CPU_BACKENDS = ("sdpa", "chunked", "auto")
MODEL_BACKENDS = ("math", "sdpa", "chunked", "auto")
# (batch, heads, q_len, k_len, head_dim): odd lengths, q_len != k_len both ways, head dims 32, 64, 80.
SHAPES = [(1, 2, 17, 17, 32), (3, 2, 19, 29, 64), (1, 3, 33, 13, 80)]
MASKS = ["none", "causal", "bool", "float", "bool+causal"]


@pytest.fixture(autouse=True)
def _threads_and_cap():
    torch.set_num_threads(2)
    previous = get_max_attention_bytes()
    yield
    set_max_attention_bytes(previous)


def _inputs(batch, heads, q_len, k_len, head_dim, mask_kind, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, head_dim, generator=gen, requires_grad=True)
    k = torch.randn(batch, heads, k_len, head_dim, generator=gen, requires_grad=True)
    v = torch.randn(batch, heads, k_len, head_dim, generator=gen, requires_grad=True)
    kwargs = {"is_causal": "causal" in mask_kind}
    if "bool" in mask_kind:
        mask = torch.rand(batch, 1, q_len, k_len, generator=gen) > 0.4
        mask[..., 0] = True  # every query attends somewhere; fully masked rows have their own test
        kwargs["attn_mask"] = mask
    if mask_kind == "float":
        kwargs["attn_mask"] = torch.randn(1, heads, 1, k_len, generator=gen)  # broadcast over batch and queries
    return q, k, v, kwargs


def _output_and_grads(q, k, v, backend, **kwargs):
    for t in (q, k, v):
        t.grad = None
    out = attention(q, k, v, backend=backend, **kwargs)
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)
    (out * weights).sum().backward()
    return out.detach(), [t.grad.clone() for t in (q, k, v)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backend_matches_math_in_output_and_gradients(backend, mask_kind, shape):
    # A small cap makes chunked work in several blocks of query rows.
    set_max_attention_bytes(shape[0] * shape[1] * shape[3] * 8 * 5)
    q, k, v, kwargs = _inputs(*shape, mask_kind)
    ref_out, ref_grads = _output_and_grads(q, k, v, "math", **kwargs)
    out, grads = _output_and_grads(q, k, v, backend, **kwargs)
    assert out.shape == (shape[0], shape[1], shape[2], shape[4])
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref_grad, atol=1e-4, rtol=0)


def test_math_matches_the_textbook_formula_with_top_left_causality():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 7, 16), torch.randn(2, 3, 5, 16), torch.randn(2, 3, 5, 16)
    scores = q @ k.transpose(-1, -2) / 4.0
    allowed = torch.ones(7, 5, dtype=torch.bool).tril()  # query i sees keys 0..i
    expected = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
    torch.testing.assert_close(attention(q, k, v, is_causal=True, backend="math"), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", ("math", "sdpa", "chunked"))
def test_rows_that_attend_nowhere_give_zeros_and_finite_gradients(backend):
    q, k, v, _ = _inputs(1, 2, 6, 5, 32, "none")
    mask = torch.ones(6, 5, dtype=torch.bool)
    mask[2] = False
    out, grads = _output_and_grads(q, k, v, backend, attn_mask=mask)
    assert torch.all(out[:, :, 2] == 0)
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_low_precision_inputs_stay_close_to_float32_math(backend, dtype):
    set_max_attention_bytes(2 * 2 * 40 * 8 * 8)
    q, k, v, kwargs = _inputs(2, 2, 40, 40, 64, "bool+causal")
    ref = attention(q.detach(), k.detach(), v.detach(), backend="math", **kwargs)
    out = attention(q.detach().to(dtype), k.detach().to(dtype), v.detach().to(dtype), backend=backend, **kwargs)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=0)


def test_chunked_holds_at_most_the_cap_in_scores_per_block(monkeypatch):
    blocks = []
    real_attend = attention_module._attend
    monkeypatch.setattr(attention_module, "_attend", lambda q, *a: blocks.append(q.shape[-2]) or real_attend(q, *a))
    batch, heads, q_len, k_len = 2, 4, 100, 60
    set_max_attention_bytes(batch * heads * k_len * 8 * 16)  # 16 rows of float32 scores + probabilities
    q, k, v, _ = _inputs(batch, heads, q_len, k_len, 32, "none")
    with torch.no_grad():
        attention(q, k, v, backend="chunked")
    assert blocks == [16] * 6 + [4]


def _spy_backends(monkeypatch):
    calls = []
    for name in ("_sdpa_attention", "_chunked_attention"):
        real = getattr(attention_module, name)
        monkeypatch.setattr(attention_module, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    return calls


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("plain", "_sdpa_attention"),  # SDPA's fused CPU kernel never holds the score matrix
        ("dropout", "_chunked_attention"),  # SDPA runs its math kernel for these three
        ("value_dim", "_chunked_attention"),
        ("mask_requires_grad", "_chunked_attention"),
    ],
)
def test_auto_sends_score_materialising_cases_over_the_cap_to_chunked(monkeypatch, case, expected):
    calls = _spy_backends(monkeypatch)
    q, k, v, _ = _inputs(1, 2, 64, 64, 32, "none")
    kwargs = {}
    if case == "dropout":
        kwargs["dropout_p"] = 0.1
    if case == "value_dim":
        v = torch.randn(1, 2, 64, 16)
    if case == "mask_requires_grad":
        kwargs["attn_mask"] = torch.zeros(1, 2, 64, 64, requires_grad=True)
    set_max_attention_bytes(1 << 30)
    assert auto_backend(q, k, v, **kwargs) == "sdpa"
    attention(q, k, v, backend="auto", **kwargs)
    set_max_attention_bytes(1024)
    assert auto_backend(q, k, v, **kwargs) == expected.strip("_").removesuffix("_attention")
    attention(q, k, v, backend="auto", **kwargs)
    assert calls == ["_sdpa_attention", expected]


def test_auto_chunked_route_matches_math_with_a_learned_bias():
    set_max_attention_bytes(1024)
    q, k, v, _ = _inputs(2, 2, 24, 24, 32, "none")
    bias = torch.randn(1, 2, 24, 24, requires_grad=True)
    outs, grads = [], []
    for backend in ("math", "auto"):
        bias.grad = None
        out, qkv_grads = _output_and_grads(q, k, v, backend, attn_mask=bias)
        outs.append(out)
        grads.append(qkv_grads + [bias.grad.clone()])
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=0)
    for grad, ref in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(grad, ref, atol=1e-4, rtol=0)


def test_unknown_backend_is_an_error_naming_the_choices():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(BackendUnavailableError, match=r"unknown attention backend 'flash3'.*auto, xformers"):
        attention(q, q, q, backend="flash3")


def test_xformers_on_cpu_says_why_it_cannot_run(monkeypatch):
    q = torch.randn(1, 1, 4, 8)
    reason = "needs CUDA tensors" if attention_module._xformers_ops() else "not installed"
    with pytest.raises(BackendUnavailableError, match=reason):
        attention(q, q, q, backend="xformers")
    # With xformers present, CPU tensors are still refused, before xformers is called.
    monkeypatch.setattr(attention_module, "_xformers_ops", lambda: object())
    with pytest.raises(BackendUnavailableError, match="needs CUDA tensors, got cpu"):
        attention(q, q, q, backend="xformers")


def test_memory_cap_comes_from_the_environment_and_rejects_nonsense(monkeypatch):
    monkeypatch.setattr(attention_module, "_max_attention_bytes", None)
    monkeypatch.setenv("VLKD_MAX_ATTENTION_BYTES", "12345")
    assert get_max_attention_bytes() == 12345
    monkeypatch.setattr(attention_module, "_max_attention_bytes", None)
    monkeypatch.setenv("VLKD_MAX_ATTENTION_BYTES", "lots")
    with pytest.raises(BackendUnavailableError, match="VLKD_MAX_ATTENTION_BYTES='lots'"):
        get_max_attention_bytes()
    with pytest.raises(BackendUnavailableError, match="positive"):
        set_max_attention_bytes(0)


# --- installing into models ---------------------------------------------------------------------------------


def _unet2d():
    from diffusers import UNet2DModel

    model = UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
    )
    sample = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    return model, lambda m: m(sample, 10).sample


def _unet2d_condition():
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=8,
        cross_attention_dim=24,
        attention_head_dim=8,
    )
    gen = torch.Generator().manual_seed(2)
    sample, context = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 5, 24, generator=gen)
    padding = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])  # exercises prepare_attention_mask
    return model, lambda m: m(sample, 10, context, encoder_attention_mask=padding).sample


def _autoencoder_kl():
    from diffusers import AutoencoderKL

    model = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
    )
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    return model, lambda m: m(images).sample


def _open_clip(**custom):
    import open_clip

    model = open_clip.CLIP(
        embed_dim=16,
        vision_cfg={"image_size": 16, "patch_size": 4, "width": 32, "head_width": 8, "layers": 2, **custom},
        text_cfg={"context_length": 12, "vocab_size": 50, "width": 32, "heads": 4, "layers": 2, **custom},
    )
    gen = torch.Generator().manual_seed(4)
    images, text = torch.randn(3, 3, 16, 16, generator=gen), torch.randint(1, 50, (3, 12), generator=gen)

    def run(m):
        image_features, text_features, _ = m(images, text)
        return torch.cat([image_features, text_features], dim=1)

    return model, run


def _open_clip_custom_blocks():
    # qk_norm and scale_heads select open_clip's own Attention class instead of nn.MultiheadAttention.
    return _open_clip(qk_norm=True, scale_heads=True, scale_attn_inner=True)


def _clip_configs():
    from transformers import CLIPTextConfig, CLIPVisionConfig

    common = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2}
    text = CLIPTextConfig(vocab_size=60, max_position_embeddings=16, eos_token_id=59, **common)
    vision = CLIPVisionConfig(image_size=16, patch_size=4, **common)
    return text, vision


def _text_inputs():
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 58, (3, 9), generator=gen)
    ids[:, -1] = 59
    padding = torch.ones(3, 9, dtype=torch.long)
    padding[0, 6:] = 0  # a padded sequence: causal + padding mask
    return ids, padding


def _hf_clip_model():
    from transformers import CLIPConfig, CLIPModel

    text, vision = _clip_configs()
    model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16))
    ids, padding = _text_inputs()
    pixels = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(6))

    def run(m):
        out = m(input_ids=ids, attention_mask=padding, pixel_values=pixels)
        return torch.cat([out.text_embeds, out.image_embeds], dim=1)

    return model, run


def _hf_clip_text_model():
    from transformers import CLIPTextModel

    model = CLIPTextModel(_clip_configs()[0])
    ids, padding = _text_inputs()

    def run(m):
        # Without padding transformers passes no mask and is_causal=True; with padding, a causal+padding mask.
        unpadded = m(input_ids=ids).last_hidden_state
        return torch.cat([m(input_ids=ids, attention_mask=padding).last_hidden_state, unpadded], dim=1)

    return model, run


def _hf_clip_vision_model():
    from transformers import CLIPVisionModel

    model = CLIPVisionModel(_clip_configs()[1])
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    return model, lambda m: m(pixel_values=pixels).last_hidden_state


MODEL_BUILDERS = {
    "UNet2DModel": _unet2d,
    "UNet2DConditionModel": _unet2d_condition,
    "AutoencoderKL": _autoencoder_kl,
    "open_clip": _open_clip,
    "open_clip_custom_blocks": _open_clip_custom_blocks,
    "CLIPModel": _hf_clip_model,
    "CLIPTextModel": _hf_clip_text_model,
    "CLIPVisionModel": _hf_clip_vision_model,
}


@pytest.fixture(scope="module")
def built_models():
    torch.manual_seed(0)
    return {name: build() for name, build in MODEL_BUILDERS.items()}


@pytest.fixture
def attention_calls(monkeypatch):
    """Counts the calls that reach vlkd's attention from inside the models."""
    calls = []
    real = install_module.attention
    monkeypatch.setattr(install_module, "attention", lambda *a, **kw: calls.append(kw["backend"]) or real(*a, **kw))
    return calls


@pytest.mark.parametrize("backend", MODEL_BACKENDS)
@pytest.mark.parametrize("name", list(MODEL_BUILDERS))
def test_model_outputs_unchanged_with_vlkd_attention_and_after_restore(built_models, attention_calls, name, backend):
    model, run = built_models[name]
    model.eval()
    set_max_attention_bytes(4096)  # several blocks per layer for chunked
    keys = list(model.state_dict())
    with torch.no_grad():
        reference = run(model)
        use_attention(model, backend)
        use_attention(model, backend)  # idempotent
        assert installed_backend(model) == backend
        patched = run(model)
        calls_after_run = len(attention_calls)
        restore_attention(model)
        assert installed_backend(model) is None
        restored = run(model)
    assert calls_after_run > 0 and set(attention_calls) == {backend}
    assert len(attention_calls) == calls_after_run  # restored model no longer calls vlkd
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(patched, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(restored, reference, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["open_clip", "open_clip_custom_blocks", "CLIPTextModel", "UNet2DConditionModel"])
def test_training_gradients_unchanged_with_chunked_attention(built_models, name):
    model, run = built_models[name]
    model.train()
    set_max_attention_bytes(4096)
    grads = []
    for install in (False, True):
        model.zero_grad()
        if install:
            use_attention(model, "chunked")
        out = run(model)
        (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        restore_attention(model)
    model.eval()
    assert grads[0].keys() == grads[1].keys() and grads[0]
    # Float32 summation order differs; measure the error against the model's largest gradient (~1e2 here).
    largest = max(g.abs().max().item() for g in grads[0].values())
    for key, ref in grads[0].items():
        torch.testing.assert_close(grads[1][key], ref, atol=2e-6 * largest, rtol=0, msg=key)


def test_switching_backend_and_context_manager_return_to_the_previous_state(built_models, attention_calls):
    model, run = built_models["open_clip"]
    model.eval()
    with torch.no_grad():
        use_attention(model, "sdpa")
        use_attention(model, "math")
        assert installed_backend(model) == "math"
        with attention_backend(model, "chunked") as inside:
            assert inside is model and installed_backend(model) == "chunked"
        assert installed_backend(model) == "math"
        restore_attention(model)
        with attention_backend(model, "sdpa"):
            run(model)
        assert installed_backend(model) is None
    assert attention_calls and set(attention_calls) == {"sdpa"}


def test_patched_open_clip_model_deep_copies_as_a_patched_model(built_models, attention_calls):
    model, run = built_models["open_clip"]
    model.eval()
    use_attention(model, "chunked")
    try:
        clone = copy.deepcopy(model)
    finally:
        restore_attention(model)
    assert installed_backend(clone) == "chunked" and installed_backend(model) is None
    with torch.no_grad():
        torch.testing.assert_close(run(clone), run(model), atol=1e-5, rtol=0)
    assert attention_calls


def test_transformers_restore_keeps_per_tower_implementations(built_models):
    model, _ = built_models["CLIPModel"]
    model.set_attn_implementation({"text_config": "eager", "vision_config": "sdpa"})
    use_attention(model, "auto")
    assert model.config.text_config._attn_implementation == "vlkd_auto"
    assert model.config.vision_config._attn_implementation == "vlkd_auto"
    restore_attention(model)
    assert model.config.text_config._attn_implementation == "eager"
    assert model.config.vision_config._attn_implementation == "sdpa"
    model.set_attn_implementation("sdpa")


def test_models_without_known_attention_are_refused():
    with pytest.raises(BackendUnavailableError, match="Sequential has no attention layer"):
        use_attention(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_installing_unknown_backend_is_refused_before_touching_the_model(built_models):
    model, _ = built_models["UNet2DModel"]
    with pytest.raises(BackendUnavailableError, match="unknown attention backend 'fast'"):
        use_attention(model, "fast")
    assert installed_backend(model) is None


def test_default_cap_is_one_gibibyte(monkeypatch):
    monkeypatch.setattr(attention_module, "_max_attention_bytes", None)
    monkeypatch.delenv("VLKD_MAX_ATTENTION_BYTES", raising=False)
    assert get_max_attention_bytes() == 1 << 30
