"""Zero-shot accuracy: agreement with open_clip's own classifier and with a transformers CLIPModel computed by hand,
the metrics on hand-made cases, prompt templates, errors and the CLI.

The tiny CLIPs are trained for a few contrastive steps first, so their predictions spread over many classes and
agreeing with the reference means more than agreeing on one class.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import balanced_accuracy_score

from vlkd.clip.tokenizer import build_word_tokenizer, caption_words, save_word_tokenizer
from vlkd.data import build_dataset
from vlkd.data.assets import load_asset_json
from vlkd.data.builtin_shapes import SPLIT_STREAMS, draw_shape_sample, shapes_test_set, shapes_vocabulary
from vlkd.errors import EvalError
from vlkd.eval.zeroshot import ClipAdapter, as_clip, fill_template, load_clip, resolve_templates, zero_shot

# The references score with sklearn too, which warns when a class is predicted that no sampled image has.
pytestmark = pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")

CONTEXT_LENGTH = 16
TRAIN_STEPS = 80
NUM_IMAGES = 300
TASK_COLUMNS = {"shape": 0, "color": 1, "shape_color": 2}  # columns of shapes_test_set(...).labels



def shapes_tokenizer():
    vocab = shapes_vocabulary()
    return build_word_tokenizer(caption_words([vocab.caption, *vocab.sizes, *vocab.colors, *vocab.shapes,
                                               *vocab.positions]), CONTEXT_LENGTH)


def embedding(output) -> torch.Tensor:
    """transformers 5 wraps the projected embedding in an output object; 4.x returned the tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def train_briefly(encode_image, encode_text, parameters, tokenizer) -> None:
    """A few CLIP contrastive steps on shapes train images and their captions."""
    vocab = shapes_vocabulary()
    samples = [draw_shape_sample(vocab, 32, SPLIT_STREAMS["train"], 0, i) for i in range(1024)]
    pixels = torch.from_numpy(np.stack([s.pixels for s in samples])).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    tokens = tokenizer([s.caption for s in samples], padding="max_length", max_length=CONTEXT_LENGTH,
                       truncation=True, return_tensors="pt")
    optimizer = torch.optim.AdamW(parameters, lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(TRAIN_STEPS):
        index = torch.randint(0, len(samples), (128,), generator=generator)
        image = F.normalize(encode_image(pixels[index]), dim=-1)
        text = F.normalize(encode_text(tokens["input_ids"][index], tokens["attention_mask"][index]), dim=-1)
        logits = 14.0 * image @ text.T
        targets = torch.arange(len(index))
        loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.fixture(scope="module")
def open_clip_folder(tmp_path_factory) -> Path:
    """An open_clip local-dir (config, safetensors, word tokenizer) of a tiny, briefly trained CLIP."""
    from safetensors.torch import save_file

    tokenizer = shapes_tokenizer()
    model_cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
        "text_cfg": {"context_length": CONTEXT_LENGTH, "vocab_size": len(tokenizer), "width": 64, "heads": 2,
                     "layers": 2, "pool_type": "argmax", "hf_tokenizer_name": "vlkd-test-words"},
    }
    preprocess_cfg = {"size": [32, 32], "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic",
                      "resize_mode": "shortest"}
    torch.manual_seed(0)
    model = open_clip.CLIP(**model_cfg)
    train_briefly(model.encode_image, lambda ids, mask: model.encode_text(ids), model.parameters(), tokenizer)
    folder = tmp_path_factory.mktemp("open-clip")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_model.safetensors")
    save_word_tokenizer(tokenizer, folder)
    return folder


def open_clip_reference(folder: Path, images: list[Image.Image], labels: torch.Tensor, classnames: list[str],
                        templates) -> dict:
    """top-1/top-5/mean per-class recall from open_clip alone: its loader, transform, tokenizer and
    build_zero_shot_classifier."""
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    model.eval()
    with torch.no_grad():
        classifier = open_clip.build_zero_shot_classifier(model, tokenizer, classnames, templates, device="cpu")
        features = model.encode_image(torch.stack([preprocess(image) for image in images]), normalize=True)
    logits = 100.0 * features @ classifier
    predictions = logits.argmax(-1)
    return {
        "top1": float((predictions == labels).float().mean()),
        "top5": float((logits.topk(5, -1).indices == labels[:, None]).any(-1).float().mean()) if len(classnames) >= 5 else None,
        "mean_per_class_recall": float(balanced_accuracy_score(labels.numpy(), predictions.numpy())),
        "distinct_predictions": len(predictions.unique()),
    }


@pytest.mark.parametrize("task", ["shape_color", "shape"])
def test_top1_equals_open_clips_own_zero_shot_classifier(open_clip_folder, task):
    test_set = shapes_test_set(32)
    images = [Image.fromarray(pixels.numpy()) for pixels in test_set.pixels[:NUM_IMAGES]]
    labels = test_set.labels[:NUM_IMAGES, TASK_COLUMNS[task]]
    dataset = build_dataset("shapes:32", "test")
    # open_clip formats string templates positionally ("{}"); the shipped ones name the class "{c}".
    templates = [lambda c, t=t: t.replace("{c}", c) for t in dataset.task_templates[task]]
    reference = open_clip_reference(open_clip_folder, images, labels, dataset.tasks[task], templates)
    ours = zero_shot(f"local-dir:{open_clip_folder}", f"shapes:32:{task}", num=NUM_IMAGES, batch_size=128)
    assert reference["distinct_predictions"] >= 5  # the model tells classes apart, so agreement has teeth
    assert ours["top1"] == reference["top1"]
    assert ours["top5"] == reference["top5"]
    assert ours["mean_per_class_recall"] == pytest.approx(reference["mean_per_class_recall"], abs=1e-12)
    assert (ours["task"], ours["num_images"], ours["num_classes"]) == (task, NUM_IMAGES, len(dataset.tasks[task]))


def test_imagefolder_with_open_clips_simple_templates(open_clip_folder, tmp_path):
    """An ImageNet-style folder: class names from subfolders, open_clip's SIMPLE_IMAGENET_TEMPLATES by name."""
    from open_clip.zero_shot_metadata import SIMPLE_IMAGENET_TEMPLATES

    test_set = shapes_test_set(32)
    vocab = shapes_vocabulary()
    chosen = [i for i in range(400) if int(test_set.labels[i, 0]) < 3][:60]
    for i in chosen:
        folder = tmp_path / vocab.shapes[int(test_set.labels[i, 0])]
        folder.mkdir(exist_ok=True)
        Image.fromarray(test_set.pixels[i].numpy()).save(folder / f"{i:04d}.png")
    files = sorted(tmp_path.rglob("*.png"))  # torchvision's ImageFolder order: class folders sorted, then files
    images = [Image.open(path).convert("RGB") for path in files]
    classnames = sorted(vocab.shapes[:3])
    labels = torch.tensor([classnames.index(path.parent.name) for path in files])
    reference = open_clip_reference(open_clip_folder, images, labels, classnames, SIMPLE_IMAGENET_TEMPLATES)
    ours = zero_shot(f"local-dir:{open_clip_folder}", f"imagefolder:{tmp_path}", templates="simple")
    assert (ours["top1"], ours["top5"], ours["task"]) == (reference["top1"], None, "class")
    assert ours["mean_per_class_recall"] == pytest.approx(reference["mean_per_class_recall"], abs=1e-12)


@pytest.fixture(scope="module")
def transformers_folder(tmp_path_factory) -> Path:
    """A tiny, briefly trained transformers CLIPModel folder with the word tokenizer and mean = std = 0.5."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tokenizer = shapes_tokenizer()
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": CONTEXT_LENGTH,
                     "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
                     "eos_token_id": tokenizer.eos_token_id},
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 64, "intermediate_size": 128,
                       "num_hidden_layers": 2, "num_attention_heads": 2},
        projection_dim=32,
    )
    torch.manual_seed(0)
    model = CLIPModel(config)
    train_briefly(lambda x: embedding(model.get_image_features(pixel_values=x)),
                  lambda ids, mask: embedding(model.get_text_features(input_ids=ids, attention_mask=mask)),
                  model.parameters(), tokenizer)
    folder = tmp_path_factory.mktemp("transformers-clip")
    model.save_pretrained(folder)
    save_word_tokenizer(tokenizer, folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=[0.5] * 3,
                       image_std=[0.5] * 3).save_pretrained(folder)
    return folder


def test_transformers_clip_model_matches_the_classifier_computed_by_hand(transformers_folder):
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(transformers_folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(transformers_folder)
    dataset = build_dataset("shapes:32", "test")
    classnames, templates = dataset.tasks["shape_color"], dataset.task_templates["shape_color"]
    test_set = shapes_test_set(32)
    with torch.no_grad():
        # Padded to the full context, where vlkd pads to the longest prompt: causal attention makes them equal.
        tokens = tokenizer([t.replace("{c}", c) for c in classnames for t in templates], padding="max_length",
                           max_length=CONTEXT_LENGTH, return_tensors="pt")
        texts = F.normalize(embedding(model.get_text_features(**tokens)), dim=-1)
        classifier = F.normalize(texts.reshape(len(classnames), len(templates), -1).mean(1), dim=-1).T
        pixels = test_set.pixels[:NUM_IMAGES].permute(0, 3, 1, 2).float() / 255.0
        images = F.normalize(embedding(model.get_image_features(pixel_values=(pixels - 0.5) / 0.5)), dim=-1)
    predictions = (100.0 * images @ classifier).argmax(-1)
    labels = test_set.labels[:NUM_IMAGES, TASK_COLUMNS["shape_color"]]
    assert len(predictions.unique()) >= 5

    clip = load_clip(str(transformers_folder), device="cpu")
    assert clip.family == "transformers" and clip.mean == (0.5, 0.5, 0.5)
    from_folder = zero_shot(clip, "shapes:32:shape_color", num=NUM_IMAGES, attention_backend=None)
    assert from_folder["top1"] == float((predictions == labels).float().mean())
    assert from_folder["mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(labels, predictions), abs=1e-12)
    # A built model with its tokenizer and normalisation gives the same figures (a bare CLIPModel would get
    # OpenAI's mean and std, as it carries no image processor).
    direct = zero_shot(as_clip(model, tokenizer, image_mean=[0.5] * 3, image_std=[0.5] * 3), "shapes:32:shape_color",
                       num=NUM_IMAGES)
    assert direct["top1"] == from_folder["top1"] and direct["top5"] == from_folder["top5"]


class ScriptedClip(torch.nn.Module):
    """A CLIP whose answers are set by hand: class ``j``'s text embeds as e_j; an image whose pixels hold
    ``-1 + k / 5`` scores class ``j`` by closeness to ``k`` (1 / (1 + |j - k|), ties broken towards larger j)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the adapter a device and a dtype

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.one_hot(tokens, self.num_classes).float()

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        predicted = ((pixels[:, 0, 0, 0] + 1.0) * 5.0).round().long()
        classes = torch.arange(self.num_classes)
        return 1.0 / (1.0 + (classes[None] - predicted[:, None]).abs()) + 1e-3 * classes


class HandMade(torch.utils.data.Dataset):
    """Labelled 4x4 images whose pixels tell ScriptedClip which class to rank first."""

    def __init__(self, labels: list[int], predicted: list[int], classnames: list[str]) -> None:
        self.labels, self.predicted = labels, predicted
        self.spec, self.split = "hand-made", "test"
        self.tasks, self.default_task = {"letter": classnames}, "letter"
        self.task_templates = {"letter": ["{c}"]}

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"pixel_values": torch.full((3, 4, 4), -1.0 + self.predicted[index] / 5.0), "label": self.labels[index]}


def scripted(classnames: list[str]) -> ClipAdapter:
    tokenizer = lambda texts: torch.tensor([classnames.index(text) for text in texts])  # noqa: E731
    return ClipAdapter(ScriptedClip(len(classnames)), tokenizer, "open_clip", (4, 4), (0.5,) * 3, (0.5,) * 3)


def test_top1_and_mean_per_class_recall_on_a_hand_made_case():
    names = ["a", "b", "c"]
    result = zero_shot(scripted(names), HandMade([0, 0, 0, 0, 1, 1, 2, 2], [0, 0, 0, 1, 1, 0, 2, 1], names),
                       batch_size=3, attention_backend=None)
    assert result["top1"] == pytest.approx(5 / 8)
    assert result["mean_per_class_recall"] == pytest.approx((3 / 4 + 1 / 2 + 1 / 2) / 3)  # not 5/8: balanced
    assert result["top5"] is None and result["num_classes"] == 3


def test_top5_is_reported_from_five_classes_on():
    names = list("abcdef")
    # Ranked first 0 -> top-5 {0..4}; first 2 -> {0..4}; first 5 -> {1..5}.
    result = zero_shot(scripted(names), HandMade([5, 0, 5, 3], [0, 0, 2, 5], names), attention_backend=None)
    assert (result["top1"], result["top5"]) == (pytest.approx(1 / 4), pytest.approx(2 / 4))
    five = zero_shot(scripted(names[:5]), HandMade([4, 0], [0, 0], names[:5]), attention_backend=None)
    assert five["top5"] == 1.0 and five["top1"] == 0.5
    four = zero_shot(scripted(names[:4]), HandMade([3, 0], [0, 0], names[:4]), attention_backend=None)
    assert four["top5"] is None


def test_a_task_with_fewer_than_two_classes_is_a_one_line_error():
    with pytest.raises(EvalError, match="at least 2 classes") as error:
        zero_shot(scripted(["only"]), HandMade([0, 0], [0, 0], ["only"]), attention_backend=None)
    assert "\n" not in str(error.value) and "'letter'" in str(error.value)


def test_templates_of_built_in_datasets_come_from_the_assets():
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    shapes = build_dataset("shapes:32", "test")
    shipped = load_asset_json("datasets/shapes.json")["templates"]
    for task in ("shape", "color", "shape_color"):
        assert resolve_templates(None, shapes, task) == shipped[task]
        assert resolve_templates("dataset", shapes, task) == shipped[task]
    digits = build_dataset("digits:16", "test")
    assert resolve_templates(None, digits, "digit") == load_asset_json("datasets/digits.json")["templates"]["digit"]
    assert resolve_templates("openai", shapes, "shape") == list(OPENAI_IMAGENET_TEMPLATES)
    assert resolve_templates("simple", shapes, "shape") == list(SIMPLE_IMAGENET_TEMPLATES)
    unlabelled_style = HandMade([0], [0], ["x", "y"])
    unlabelled_style.task_templates = {}
    assert resolve_templates(None, unlabelled_style, "letter") == list(OPENAI_IMAGENET_TEMPLATES)
    with pytest.raises(EvalError, match="unknown templates 'imagenet'"):
        resolve_templates("imagenet", shapes, "shape")
    assert [fill_template(t, "red star") for t in ("a {c}.", "a {}.", lambda c: f"the {c}")] == \
        ["a red star.", "a red star.", "the red star"]


def test_cli_zeroshot_prints_a_table_and_writes_json(open_clip_folder, tmp_path, capsys):
    from vlkd.cli import main

    out = tmp_path / "zeroshot.json"
    assert main(["eval", "zeroshot", "--model", f"local-dir:{open_clip_folder}", "--dataset", "shapes:32:shape",
                 "--num", "64", "--device", "cpu", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| metric | model | dataset | top1 | top5 |" in printed
    result = json.loads(out.read_text())
    assert (result["task"], result["num_images"], result["num_classes"], result["dataset"]) == ("shape", 64, 8, "shapes:32:shape")
    assert result["top1"] == zero_shot(f"local-dir:{open_clip_folder}", "shapes:32:shape", num=64)["top1"]
    assert main(["eval", "zeroshot", "--model", str(open_clip_folder), "--dataset", "shapes:32:color@test",
                 "--templates", "simple", "--num", "16", "--device", "cpu"]) == 0
    assert "| zeroshot |" in capsys.readouterr().out

    (tmp_path / "one" / "circle").mkdir(parents=True)
    Image.fromarray(shapes_test_set(32).pixels[0].numpy()).save(tmp_path / "one" / "circle" / "0.png")
    assert main(["eval", "zeroshot", "--model", str(open_clip_folder), "--dataset", f"imagefolder:{tmp_path / 'one'}",
                 "--device", "cpu"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "at least 2 classes" in error[0]
