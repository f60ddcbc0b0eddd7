"""Exported CLIP students load in open_clip and transformers without vlkd, with equal embeddings (within 1e-4)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from clip_fixtures import make_tiny_teacher

from vlkd.clip.export import export_student, text_not_standard, vision_not_plain
from vlkd.clip.models import ClipStudentConfig, build_student, load_teacher

VISION = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16, "mlp_ratio": 2.0}
TEXT = {"width": 32, "heads": 2, "layers": 2, "mlp_ratio": 2.0}
TEXTS = ["a small red star in the top left corner", "a drawing of a blue heart.", "something coloured green."]

# Runs in a fresh interpreter that never imports vlkd: open_clip and transformers only.
CHECK = textwrap.dedent("""
    import json, sys, torch, open_clip
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel, CLIPVisionModelWithProjection

    def tensor(x):
        return x if isinstance(x, torch.Tensor) else x.pooler_output

    cases, texts = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    report = {}
    for folder in cases:
        reference = torch.load(f"{folder}.reference.pt")
        pixels = reference["pixels"]
        model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")
        tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
        model.eval()
        config = json.load(open(f"{folder}/transformers/config.json"))
        with torch.no_grad():
            tokens = tokenizer(texts)
            result = {"open_clip_image": (model.encode_image(pixels) - reference["image"]).abs().max().item(),
                      "open_clip_text": (model.encode_text(tokens) - reference["text"]).abs().max().item(),
                      "class": config["architectures"][0]}
            if result["class"] == "CLIPModel":
                hf = CLIPModel.from_pretrained(f"{folder}/transformers").eval()
                hf_tokenizer = AutoTokenizer.from_pretrained(f"{folder}/transformers")
                encoded = hf_tokenizer(texts, padding=True, return_tensors="pt")
                text = tensor(hf.get_text_features(**encoded))
                result["transformers_text"] = (text - reference["text"]).abs().max().item()
                result["logit_scale"] = abs(hf.logit_scale.item() - reference["logit_scale"].item())
            else:
                hf = CLIPVisionModelWithProjection.from_pretrained(f"{folder}/transformers").eval()
            image = hf(pixel_values=pixels).image_embeds if result["class"] != "CLIPModel" else \\
                tensor(hf.get_image_features(pixel_values=pixels))
            result["transformers_image"] = (image - reference["image"]).abs().max().item()
        processor = CLIPImageProcessor.from_pretrained(f"{folder}/transformers")
        result["processor"] = [processor.image_mean, processor.image_std, processor.crop_size["height"]]
        report[folder] = result
    report["vlkd_imported"] = "vlkd" in sys.modules
    print(json.dumps(report))
""")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return load_teacher(f"local-dir:{make_tiny_teacher(tmp_path_factory.mktemp('teacher'))}")


def export_with_reference(student, folder) -> str:
    """Export, and save what the in-memory open_clip model gives for fixed model-space pixels and the texts."""
    torch.manual_seed(1)
    for p in student.clip.parameters():  # random init leaves biases at zero: give every weight a value to check
        p.data.add_(0.02 * torch.randn_like(p))
    export_student(student, folder)
    clip = student.clip.eval()
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = {"pixels": pixels, "image": clip.encode_image(pixels),
                     "text": clip.encode_text(student.tokenizer(TEXTS)),
                     "logit_scale": clip.logit_scale.detach().clone()}
    torch.save(reference, f"{folder}.reference.pt")
    return str(folder)


def test_open_clip_and_transformers_load_the_student_without_vlkd(teacher, tmp_path):
    word_gelu = build_student(ClipStudentConfig(embed_dim=16, vision_cfg=VISION, text_cfg=TEXT), teacher)
    bpe_quick_gelu = build_student(
        ClipStudentConfig(embed_dim=16, vision_cfg=VISION, quick_gelu=True,
                          text_cfg={**TEXT, "context_length": 20, "vocab_size": 49408}), teacher, "train")
    layer_scale_text = {**TEXT, "ls_init_value": 0.5}
    vision_only = build_student(ClipStudentConfig(embed_dim=16, vision_cfg=VISION, text_cfg=layer_scale_text), teacher)
    assert text_not_standard(vision_only.model_cfg) == "layer scale"
    folders = [export_with_reference(student, tmp_path / name) for student, name in
               ((word_gelu, "word"), (bpe_quick_gelu, "bpe"), (vision_only, "vision"))]
    def config(name: str) -> dict:
        return json.loads((tmp_path / name / "transformers" / "config.json").read_text())

    assert config("bpe")["vision_config"]["hidden_act"] == "quick_gelu"
    assert config("word")["text_config"]["hidden_act"] == "gelu"
    assert not (tmp_path / "word" / "image_head").exists()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", CHECK, json.dumps(folders), json.dumps(TEXTS)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report.pop("vlkd_imported") is False
    assert [report[f]["class"] for f in folders] == ["CLIPModel", "CLIPModel", "CLIPVisionModelWithProjection"]
    for folder in folders:
        result = report[folder]
        for key in ("open_clip_image", "open_clip_text", "transformers_image", "transformers_text", "logit_scale"):
            assert result.get(key, 0.0) < 1e-4, (folder, key, result)
        assert result["processor"] == [[0.5, 0.5, 0.5], [0.5, 0.5, 0.5], 32]


def test_non_vit_towers_are_named():
    assert vision_not_plain({"vision_cfg": {"timm_model_name": "resnet10t"}}) == "a timm image tower"
    assert vision_not_plain({"vision_cfg": {"layers": [2, 2, 2, 2]}}) == "a ResNet image tower"
    assert vision_not_plain({"vision_cfg": {"width": 64, "head_width": 32}}) is None
    hf_text = {"text_cfg": {"hf_model_name": "bert-base-uncased"}}
    assert text_not_standard(hf_text) == "a custom or Hugging Face text tower"


def test_an_exported_transformers_folder_serves_as_a_teacher(teacher, tmp_path):
    """The transformers teacher path, offline: a CLIPModel folder (here, an export) loads as a teacher whose
    embeddings are the open_clip model's, and students read its tokenizer."""
    from vlkd.errors import RecipeError

    student = build_student(ClipStudentConfig(embed_dim=16, vision_cfg=VISION, text_cfg=TEXT), teacher)
    export_student(student, tmp_path / "student")
    hf_teacher = load_teacher(f"transformers:{tmp_path / 'student' / 'transformers'}")
    assert hf_teacher.family == "transformers" and hf_teacher.embed_dim == 16
    assert not any(p.requires_grad for p in hf_teacher.parameters())
    pixels = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    tokens = hf_teacher.tokenizer(TEXTS)
    assert torch.equal(tokens, student.tokenizer(TEXTS))
    ours, theirs = student.eval()(pixels, tokens), hf_teacher(pixels, tokens)
    for key in ("image_features", "text_features"):
        assert torch.allclose(ours[key], theirs[key], atol=1e-5), key
    second = build_student(ClipStudentConfig(embed_dim=8, vision_cfg=VISION, text_cfg=TEXT), hf_teacher)
    assert second.model_cfg["text_cfg"]["vocab_size"] == 38 and second.model_cfg["text_cfg"]["pool_type"] == "argmax"
    with pytest.raises(RecipeError, match="text_mode locked shares the teacher's open_clip text tower"):
        build_student(ClipStudentConfig(embed_dim=8, vision_cfg=VISION), hf_teacher, "locked")
