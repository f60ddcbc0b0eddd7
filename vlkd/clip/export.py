"""Save a CLIP student so open_clip and transformers load it without vlkd.

- open_clip local dir: ``open_clip_config.json`` ({"model_cfg", "preprocess_cfg"}), ``open_clip_model.safetensors``
  and the tokenizer's files when it is not open_clip's built-in BPE; ``create_model_and_transforms("local-dir:F")``
  and ``get_tokenizer("local-dir:F")`` load it. Projection heads used only for distillation are not saved.
- transformers (``F/transformers``), for plain ViT students (no timm tower, layer scale, attention pooling or custom
  blocks): a ``CLIPModel`` when the text tower is a standard CLIP text transformer, else a
  ``CLIPVisionModelWithProjection``. open_clip's fused ``in_proj`` splits into q, k, v; its ``x @ proj``
  projections become bias-free ``Linear`` weights (transposed); ``quick_gelu`` maps to ``hidden_act``
  ``quick_gelu``, nn.GELU to ``gelu``. A tokenizer and a ``CLIPImageProcessor`` with the model's mean, std and size
  are saved beside it: the word-level tokenizer as it is, open_clip's BPE rebuilt as a ``CLIPTokenizer`` with the
  same ids.

Text pooling: open_clip's ``argmax`` takes the highest id (the end token when it is last in the vocabulary);
transformers takes the first ``eos_token_id``, or the argmax when ``eos_token_id`` is 2 (its legacy rule), which is
what the config says when the end token is not the highest id.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlkd.errors import VlkdError
from vlkd.files import staged_folder

TRANSFORMERS_SUBFOLDER = "transformers"
_CUSTOM_BLOCK_KEYS = ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc")
_LEGACY_ARGMAX_EOS = 2


def _custom_block(cfg: dict) -> bool:
    return cfg.get("block_type") not in (None, "default") or any(cfg.get(k) for k in _CUSTOM_BLOCK_KEYS)


def vision_not_plain(model_cfg: dict) -> str | None:
    """Why the image tower has no transformers CLIP equivalent, or None when it has one."""
    vision = model_cfg.get("vision_cfg", {})
    checks = [
        ("timm_model_name" in vision and vision["timm_model_name"], "a timm image tower"),
        (isinstance(vision.get("layers", 12), (list, tuple)), "a ResNet image tower"),
        (vision.get("ls_init_value") is not None, "layer scale"),
        (vision.get("attentional_pool"), "attentional pooling"),
        (vision.get("no_ln_pre"), "no pre-LayerNorm"),
        (vision.get("pos_embed_type", "learnable") != "learnable", "fixed positional embeddings"),
        (vision.get("pool_type", "tok") != "tok", "pooling other than the class token"),
        (_custom_block(vision), "custom attention blocks"),
        (vision.get("act_kwargs"), "activation options"),
        (set(vision.get("norm_kwargs") or {}) - {"eps"}, "LayerNorm options"),
        (vision.get("width", 768) % vision.get("head_width", 64), "a width not divisible by head_width"),
    ]
    return next((reason for failed, reason in checks if failed), None)


def text_not_standard(model_cfg: dict) -> str | None:
    """Why the text tower is not a standard CLIP text transformer, or None when it is."""
    text = model_cfg.get("text_cfg", {})
    checks = [
        (model_cfg.get("custom_text") or text.get("hf_model_name"), "a custom or Hugging Face text tower"),
        (text.get("embed_cls"), "a class token"),
        (text.get("no_causal_mask"), "no causal mask"),
        (text.get("pool_type", "argmax") not in ("argmax", "eos"), "pooling other than the end token"),
        (text.get("pool_type") == "eos" and text.get("eos_id", 2) == _LEGACY_ARGMAX_EOS, "end token id 2"),
        (text.get("proj_type", "linear") != "linear" or text.get("proj_bias"), "a projection other than linear"),
        (text.get("ls_init_value") is not None, "layer scale"),
        (_custom_block(text), "custom attention blocks"),
        (text.get("act_kwargs"), "activation options"),
        (set(text.get("norm_kwargs") or {}) - {"eps"}, "LayerNorm options"),
    ]
    return next((reason for failed, reason in checks if failed), None)


# ------------------------------------------------------------------------------------------------------- open_clip


def save_open_clip(folder: Path, clip: nn.Module, model_cfg: dict, preprocess_cfg: dict, tokenizer: Any) -> None:
    """Write an open_clip local dir into ``folder`` (which exists)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    config = {"model_cfg": model_cfg, "preprocess_cfg": _plain(preprocess_cfg)}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
    state = {k: v.detach().float().cpu().contiguous() for k, v in clip.state_dict().items()}
    save_file(state, folder / "open_clip_model.safetensors")
    if tokenizer is not None:
        tokenizer.save(folder)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------------- transformers


def _layer_norm_eps(cfg: dict) -> float:
    return float((cfg.get("norm_kwargs") or {}).get("eps", 1e-5))


def _token_ids(tokenizer: Any, text_cfg: dict) -> dict[str, int]:
    """bos / eos / pad ids for the transformers text config, with eos chosen so pooling matches open_clip's."""
    inner = getattr(tokenizer, "tokenizer", tokenizer)  # a vlkd TextTokenizer holds an open_clip tokenizer
    hf = getattr(inner, "tokenizer", None)
    if hf is not None:
        bos, eos, pad = hf.bos_token_id, hf.eos_token_id, hf.pad_token_id
    elif inner is not None:  # open_clip's SimpleTokenizer: pads with 0
        bos, eos, pad = inner.sot_token_id, inner.eot_token_id, 0
    else:
        bos, eos, pad = None, None, None
    vocab_size = int(text_cfg.get("vocab_size", 49408))
    if text_cfg.get("pool_type", "argmax") == "eos":
        eos = int(text_cfg.get("eos_id", eos))
    elif eos is None or int(eos) != vocab_size - 1:
        eos = _LEGACY_ARGMAX_EOS
    return {"bos_token_id": int(bos if bos is not None else 0), "eos_token_id": int(eos),
            "pad_token_id": int(pad if pad is not None else 0)}


def transformers_config(model_cfg: dict, tokenizer: Any, with_text: bool):
    """A ``CLIPConfig`` (with text) or ``CLIPVisionConfig`` describing the open_clip ``model_cfg``."""
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    act = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"
    embed_dim = int(model_cfg["embed_dim"])
    v = {"layers": 12, "width": 768, "head_width": 64, "mlp_ratio": 4.0, "patch_size": 16, "image_size": 224,
         **model_cfg["vision_cfg"]}
    size = v["image_size"] if isinstance(v["image_size"], int) else v["image_size"][0]
    patch = v["patch_size"] if isinstance(v["patch_size"], int) else v["patch_size"][0]
    vision = CLIPVisionConfig(hidden_size=v["width"], intermediate_size=int(v["width"] * v["mlp_ratio"]),
                              num_hidden_layers=v["layers"], num_attention_heads=v["width"] // v["head_width"],
                              image_size=size, patch_size=patch, hidden_act=act, projection_dim=embed_dim,
                              layer_norm_eps=_layer_norm_eps(v))
    if not with_text:
        return vision
    t = {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12, "mlp_ratio": 4.0,
         **model_cfg["text_cfg"]}
    text = CLIPTextConfig(vocab_size=t["vocab_size"], hidden_size=t["width"],
                          intermediate_size=int(t["width"] * t["mlp_ratio"]), num_hidden_layers=t["layers"],
                          num_attention_heads=t["heads"], max_position_embeddings=t["context_length"],
                          hidden_act=act, projection_dim=embed_dim, layer_norm_eps=_layer_norm_eps(t),
                          **_token_ids(tokenizer, t))
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=embed_dim)


def _blocks(state: dict, source: str, target: str, out: dict) -> None:
    """open_clip residual blocks under ``source`` -> transformers encoder layers under ``target``."""
    prefix = f"{source}.resblocks."
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        index, name = key[len(prefix):].split(".", 1)
        layer = f"{target}.layers.{index}"
        if name in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = name.rsplit("_", 1)[1]
            for part, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"{layer}.self_attn.{part}.{kind}"] = chunk
            continue
        renamed = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
                   "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
        module, parameter = name.rsplit(".", 1)
        out[f"{layer}.{renamed[module]}.{parameter}"] = value


def transformers_state_dict(state: dict[str, torch.Tensor], with_text: bool) -> dict[str, torch.Tensor]:
    """open_clip CLIP weights under transformers CLIP names (``CLIPModel``, or the vision model alone)."""
    out = {
        "vision_model.embeddings.class_embedding": state["visual.class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": state["visual.conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": state["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": state["visual.ln_pre.weight"],  # sic: transformers' name
        "vision_model.pre_layrnorm.bias": state["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": state["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": state["visual.ln_post.bias"],
        "visual_projection.weight": state["visual.proj"].T,
    }
    _blocks(state, "visual.transformer", "vision_model.encoder", out)
    if with_text:
        out.update({
            "text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
            "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
            "text_model.final_layer_norm.weight": state["ln_final.weight"],
            "text_model.final_layer_norm.bias": state["ln_final.bias"],
            "text_projection.weight": state["text_projection"].T,
            "logit_scale": state["logit_scale"].reshape(()),
        })
        _blocks(state, "transformer", "text_model.encoder", out)
    return {k: v.detach().float().cpu().contiguous() for k, v in out.items()}


def bpe_clip_tokenizer(context_length: int):
    """open_clip's built-in BPE as a transformers ``CLIPTokenizer`` with the same vocabulary, merges and ids
    (through ``vocab.json`` / ``merges.txt``, the files every transformers version reads)."""
    import tempfile

    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    simple = SimpleTokenizer()
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {names.get(token, token): index for token, index in simple.encoder.items()}
    merges = [" ".join(pair) for pair, _ in sorted(simple.bpe_ranks.items(), key=lambda item: item[1])]
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "vocab.json").write_text(json.dumps(vocab))
        (Path(folder) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer.from_pretrained(folder, model_max_length=context_length)


def save_transformers(folder: Path, clip: nn.Module, model_cfg: dict, preprocess_cfg: dict, tokenizer: Any) -> str:
    """Write a transformers CLIP folder; returns the class written. Raises VlkdError for non-plain-ViT students."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPVisionModelWithProjection

    reason = vision_not_plain(model_cfg)
    if reason is not None:
        raise VlkdError(f"the student's image tower has {reason}; transformers' CLIP has no equivalent, so only the "
                        "open_clip folder is written")
    with_text = text_not_standard(model_cfg) is None
    config = transformers_config(model_cfg, tokenizer, with_text)
    model = (CLIPModel if with_text else CLIPVisionModelWithProjection)(config)
    state = transformers_state_dict(clip.state_dict(), with_text)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise VlkdError(f"transformers CLIP export: weights do not line up ({(missing + unexpected)[0]})")
    folder = Path(folder)
    model.save_pretrained(folder)
    size = preprocess_cfg.get("size", config.vision_config.image_size if with_text else config.image_size)
    size = size if isinstance(size, int) else int(size[0])
    processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                   image_mean=list(preprocess_cfg["mean"]), image_std=list(preprocess_cfg["std"]),
                                   resample=2 if preprocess_cfg.get("interpolation") == "bilinear" else 3)
    processor.save_pretrained(folder)
    if with_text and tokenizer is not None:
        if tokenizer.folder is None and not hasattr(tokenizer.tokenizer, "save_pretrained"):
            bpe_clip_tokenizer(tokenizer.context_length).save_pretrained(str(folder))
        else:
            tokenizer.save(folder)
    return type(model).__name__


# ------------------------------------------------------------------------------------------------------- students


def write_student(folder: Path, student: nn.Module) -> dict:
    """Write a ClipStudent into ``folder``: the open_clip files, and ``transformers/`` when the towers allow.
    Returns what was written (for vlkd.json)."""
    clip, model_cfg, preprocess_cfg = student.clip, student.model_cfg, student.preprocess_cfg
    save_open_clip(folder, clip, model_cfg, preprocess_cfg, student.tokenizer)
    written = {"open_clip": ".", "projection_heads": "dropped" if student.image_head is not None else "none"}
    reason = vision_not_plain(model_cfg)
    if reason is None:
        (Path(folder) / TRANSFORMERS_SUBFOLDER).mkdir()
        written["transformers"] = {"folder": TRANSFORMERS_SUBFOLDER, "class": save_transformers(
            Path(folder) / TRANSFORMERS_SUBFOLDER, clip, model_cfg, preprocess_cfg, student.tokenizer)}
        text_reason = text_not_standard(model_cfg)
        if text_reason:
            written["transformers"]["text_tower_left_out"] = text_reason
    else:
        written["transformers"] = f"not written: the image tower has {reason}"
    return written


def export_student(student: nn.Module, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write a ClipStudent as a complete output folder (staged, then renamed into place)."""
    with staged_folder(out, overwrite=overwrite) as folder:
        write_student(folder, student)
    return Path(out)
