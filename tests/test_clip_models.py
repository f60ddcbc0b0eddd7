"""CLIP teachers, students, text-tower modes and weight inheritance, on a tiny local teacher (no network)."""

from __future__ import annotations

import pytest
import torch
from clip_fixtures import make_tiny_teacher

from vlkd.clip.inherit import inherit_weights, layer_map
from vlkd.clip.models import (ClipStudentConfig, build_student, image_tower_parameters, load_teacher,
                              parse_teacher_spec)
from vlkd.errors import ModelLoadError, RecipeError

SMALL = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16,
                                         "mlp_ratio": 2.0},
         "text_cfg": {"width": 32, "heads": 2, "layers": 1, "mlp_ratio": 2.0}}
CAPTIONS = ["a small red star in the top left corner", "a large blue heart on the right", "a green circle."]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return load_teacher(f"local-dir:{make_tiny_teacher(tmp_path_factory.mktemp('teacher'))}")


@pytest.fixture(scope="module")
def pixels():
    return torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_teacher_is_frozen_in_eval_mode_and_normalised(teacher, pixels):
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    out = teacher(pixels, teacher.tokenizer(CAPTIONS))
    assert out["image_features"].shape == (3, 32) and out["text_features"].shape == (3, 32)
    assert torch.allclose(out["image_features"].norm(dim=-1), torch.ones(3))
    assert teacher.embed_dim == 32 and len(teacher.identity) == 16


def test_teacher_specs_name_their_family_without_loading():
    assert parse_teacher_spec("ViT-B-32:openai") == ("open_clip", "ViT-B-32", "openai")
    assert parse_teacher_spec("hf-hub:timm/ViT-B-16-SigLIP") == ("open_clip", "hf-hub:timm/ViT-B-16-SigLIP", None)
    assert parse_teacher_spec("openai/clip-vit-base-patch32") == ("transformers", "openai/clip-vit-base-patch32", None)
    assert parse_teacher_spec("transformers:openai/clip-vit-base-patch32")[0] == "transformers"
    with pytest.raises(ModelLoadError, match="unknown open_clip model 'ViT-B-33'; close names: ViT-B-32"):
        parse_teacher_spec("ViT-B-33:openai")
    with pytest.raises(ModelLoadError, match="needs a pretrained tag, as ViT-B-32:TAG"):
        parse_teacher_spec("ViT-B-32")
    with pytest.raises(ModelLoadError, match="no such folder"):
        parse_teacher_spec("local-dir:/no/such/folder")


def test_shared_tokenizer_student_reads_the_teachers_vocabulary_and_has_heads(teacher, pixels):
    student = build_student(ClipStudentConfig(**SMALL), teacher, "shared-tokenizer")
    assert student.tokenizer is teacher.tokenizer
    assert student.model_cfg["text_cfg"]["vocab_size"] == teacher.model_cfg["text_cfg"]["vocab_size"]
    assert student.model_cfg["text_cfg"]["width"] == 32  # the student's own tower
    out = student(pixels, student.tokenizer(CAPTIONS))
    assert out["image_features"].shape == (3, 16) and out["image_distill_features"].shape == (3, 32)
    assert out["logit_scale"].item() == pytest.approx(teacher.model.logit_scale.exp().item())


def test_locked_student_shares_the_frozen_teacher_text_tower(teacher, pixels):
    student = build_student(ClipStudentConfig(**SMALL), teacher, "locked")
    tokens = teacher.tokenizer(CAPTIONS)
    assert student.image_head is None and student.model_cfg["embed_dim"] == teacher.embed_dim
    assert torch.equal(student(pixels, tokens)["text_features"], teacher(pixels, tokens)["text_features"])
    trainable = [name for name, p in student.named_parameters() if p.requires_grad]
    assert trainable and all(name.startswith(("clip.visual.", "clip.logit_scale")) for name in trainable)


def test_locked_mode_rejects_another_tokenizer(teacher):
    with pytest.raises(RecipeError, match=r"text_mode locked: the student's tokenizer \(open_clip BPE, vocabulary "
                                          r"49408, context 77\) differs from the teacher's"):
        build_student(ClipStudentConfig(model="ViT-S-32"), teacher, "locked")


def test_train_mode_student_has_its_own_tokenizer(teacher, pixels):
    config = ClipStudentConfig(embed_dim=16, vision_cfg=SMALL["vision_cfg"],
                               text_cfg={"context_length": 20, "vocab_size": 49408, "width": 32, "heads": 2,
                                         "layers": 1})
    student = build_student(config, teacher, "train")
    assert student.tokenizer.name == "open_clip BPE" and student.tokenizer(CAPTIONS).shape == (3, 20)
    with pytest.raises(RecipeError, match="text_mode train needs the student's own text tower"):
        build_student(ClipStudentConfig(embed_dim=16, vision_cfg=SMALL["vision_cfg"]), teacher, "train")


def test_student_config_errors():
    with pytest.raises(ValueError, match="has no embed_dim"):
        ClipStudentConfig(vision_cfg={"width": 64})
    with pytest.raises(ValueError, match="name an open_clip model"):
        ClipStudentConfig()


def test_unknown_student_model_lists_close_names(teacher):
    with pytest.raises(ModelLoadError, match="unknown open_clip student model 'ViT-S-33'; close names: ViT-S-32"):
        build_student(ClipStudentConfig(model="ViT-S-33"), teacher)


def test_timm_image_tower_through_open_clip(teacher, pixels):
    # A CNN: it reads any input size (a timm ViT keeps the input size it was defined with).
    config = ClipStudentConfig(embed_dim=16, vision_cfg={"timm_model_name": "resnet10t", "image_size": 32},
                               text_cfg=SMALL["text_cfg"])
    student = build_student(config, teacher, "shared-tokenizer")
    assert student(pixels)["image_features"].shape == (3, 16)


def test_layer_map_is_evenly_spaced_with_ends_kept():
    assert layer_map(4, 12) == [0, 4, 7, 11]
    assert layer_map(3, 4) == [0, 2, 3] and layer_map(3, 6) == [0, 3, 5] and layer_map(1, 4) == [0]
    assert layer_map(3, 3) == [0, 1, 2]
    with pytest.raises(RecipeError, match="only makes towers shallower"):
        layer_map(5, 4)


def test_inheriting_into_the_teachers_own_shape_reproduces_it(teacher, pixels):
    cfg = teacher.model_cfg
    config = ClipStudentConfig(embed_dim=cfg["embed_dim"], vision_cfg=dict(cfg["vision_cfg"]),
                               text_cfg={k: cfg["text_cfg"][k] for k in ("width", "heads", "layers", "mlp_ratio")})
    student = build_student(config, teacher, "shared-tokenizer")
    report = inherit_weights(student, teacher)
    assert report["cut"] == 0 and report["left_out"] == []
    theirs = teacher.model.state_dict()
    assert all(torch.equal(value, theirs[key]) for key, value in student.clip.state_dict().items())
    tokens = teacher.tokenizer(CAPTIONS)
    ours, reference = student(pixels, tokens), teacher(pixels, tokens)
    for key in ("image_features", "text_features"):
        assert torch.allclose(ours[key], reference[key], atol=1e-6)


def test_a_narrower_shallower_student_inherits_without_shape_errors(teacher, pixels):
    student = build_student(ClipStudentConfig(**SMALL), teacher, "shared-tokenizer")
    report = inherit_weights(student, teacher)
    assert report["left_out"] == [] and report["cut"] > 0
    assert report["layers"]["visual.transformer.resblocks"] == [0]
    # First-k channels: the student's patch kernel is the first 32 of the teacher's 64 filters.
    assert torch.equal(student.clip.visual.conv1.weight, teacher.model.visual.conv1.weight[:32])
    q_rows = student.clip.visual.transformer.resblocks[0].attn.in_proj_weight
    teacher_rows = teacher.model.visual.transformer.resblocks[0].attn.in_proj_weight
    assert torch.equal(q_rows[32:48], teacher_rows[64:80, :32])  # k of the first head, first 32 inputs
    assert torch.isfinite(student(pixels, teacher.tokenizer(CAPTIONS))["image_features"]).all()
    assert image_tower_parameters(student) < image_tower_parameters(teacher) / 4


def test_inheriting_across_patch_grids_resamples_positions(teacher, pixels):
    vision = {**SMALL["vision_cfg"], "patch_size": 4}  # 8 x 8 grid against the teacher's 4 x 4
    student = build_student(ClipStudentConfig(**{**SMALL, "vision_cfg": vision}), teacher, "shared-tokenizer")
    report = inherit_weights(student, teacher)
    assert report["left_out"] == ["visual.conv1.weight"]  # a kernel of another size stays as initialised
    assert student.clip.visual.positional_embedding.shape == (65, 32)
    assert torch.equal(student.clip.visual.positional_embedding[0], teacher.model.visual.positional_embedding[0, :32])
