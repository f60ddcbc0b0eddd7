"""The teacher-embedding cache: filled once, read back from safetensors shards, and training never runs the teacher."""

from __future__ import annotations

import pytest
import torch
from clip_fixtures import make_tiny_teacher

from vlkd.clip.cache import TeacherCache, cache_key, teacher_cache
from vlkd.clip.data import CaptionPool, ClipCollate
from vlkd.clip.losses import ClipLossMethod, build_loss
from vlkd.clip.models import ClipStudentConfig, build_student, load_teacher
from vlkd.data import build_dataset
from vlkd.errors import DataError, RecipeError
from vlkd.recipes import TrainConfig
from vlkd.train import fit

POOL = 24
BATCH = 8


class Counting(torch.nn.Module):
    """A teacher that counts its forward calls."""

    def __init__(self, teacher):
        super().__init__()
        self.teacher, self.calls = teacher, 0

    def forward(self, pixels, text=None):
        self.calls += 1
        return self.teacher(pixels, text)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return load_teacher(f"local-dir:{make_tiny_teacher(tmp_path_factory.mktemp('teacher'))}")


@pytest.fixture(scope="module")
def pool():
    return CaptionPool(build_dataset("shapes:32", "train"), POOL, reduce_captions=True)


def test_the_cache_is_filled_once_and_training_reads_it(teacher, pool, tmp_path):
    counting = Counting(teacher)
    collate = ClipCollate(teacher.tokenizer)
    key = {"teacher": teacher.identity, "data": "shapes:32", "pool_size": POOL}
    cache = teacher_cache(tmp_path / "cache", key, counting, pool, collate, batch_size=BATCH)
    assert counting.calls == POOL // BATCH and len(cache) == POOL
    assert sorted(p.name for p in (tmp_path / "cache" / cache_key(key)).iterdir()) == ["meta.json",
                                                                                       "shard-00000.safetensors"]

    batch = collate([pool[i] for i in (5, 7, 20)])
    with torch.no_grad():
        direct = teacher(batch["pixel_values"], batch["text"])
    cached = cache.lookup(batch["index"])
    for name in ("image_features", "text_features", "logit_scale"):
        assert torch.allclose(cached[name], direct[name], atol=1e-6), name

    # Two epochs of training (3 steps each): the teacher is handed to the loop but never runs.
    student = build_student(ClipStudentConfig(embed_dim=16, vision_cfg={"image_size": 32, "patch_size": 8, "width": 32,
                                                                        "layers": 1, "head_width": 16},
                                              text_cfg={"width": 32, "heads": 2, "layers": 1}), teacher)
    method = ClipLossMethod([build_loss("fd"), build_loss("affinity_kl")], cache=cache)
    config = TrainConfig(steps=2 * POOL // BATCH, batch_size=BATCH, lr=1e-3, checkpoint_every=100)
    result = fit(method, student, pool, config, tmp_path / "run", teacher=counting, collate_fn=collate)
    assert counting.calls == POOL // BATCH and result.steps == 6

    # A later run reads the shards back: same numbers, no teacher.
    again = teacher_cache(tmp_path / "cache", key, counting, pool, collate, batch_size=BATCH)
    assert counting.calls == POOL // BATCH
    assert torch.equal(again.image_features, cache.image_features)
    assert torch.equal(again.text_features, cache.text_features)


def test_an_interrupted_fill_is_done_again(teacher, pool, tmp_path):
    counting = Counting(teacher)
    key = {"teacher": teacher.identity, "pool_size": POOL}
    teacher_cache(tmp_path, key, counting, pool, ClipCollate(teacher.tokenizer), batch_size=BATCH)
    (tmp_path / cache_key(key) / "meta.json").unlink()  # as if killed before the last write
    assert TeacherCache.read(tmp_path / cache_key(key)) is None
    teacher_cache(tmp_path, key, counting, pool, ClipCollate(teacher.tokenizer), batch_size=BATCH)
    assert counting.calls == 2 * POOL // BATCH
    assert cache_key(key) != cache_key({**key, "pool_size": POOL + 1})


def test_the_pool_draws_each_shapes_sample_once_and_fixes_its_caption(pool):
    first = pool[3]
    calls = []
    original = pool.dataset.__class__.__getitem__
    pool.dataset.__class__.__getitem__ = lambda self, i: calls.append(i) or original(self, i)
    try:
        second = pool[3]
    finally:
        pool.dataset.__class__.__getitem__ = original
    assert calls == [] and torch.equal(first["pixel_values"], second["pixel_values"])
    assert first["caption"] == second["caption"] and first["index"] == 3
    reduced = [pool[i]["caption"] != pool.dataset[i]["caption"] for i in range(POOL)]
    assert 0 < sum(reduced) < POOL  # about half cut to a few attributes, the choice fixed by the index


def test_pool_errors():
    with pytest.raises(RecipeError, match="set method.pool_size"):
        CaptionPool(build_dataset("shapes:32", "train"))
    with pytest.raises(RecipeError, match="reduce_captions needs the shapes"):
        CaptionPool(build_dataset("digits:8", "train"), reduce_captions=True)
    with pytest.raises(DataError, match="has no captions"):
        CaptionPool(build_dataset("digits:8", "train"))[0]
