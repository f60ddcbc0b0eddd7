"""Tests for vlkd.data: built-in digits and shapes, file datasets, errors, collate."""

from __future__ import annotations

import csv
import hashlib
import io
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlkd.data import assets_dir, build_dataset, collate, dataset_info
from vlkd.data.builtin_shapes import shapes_vocabulary
from vlkd.errors import DataError

REPO_ROOT = Path(__file__).resolve().parents[1]


def _write_image(path: Path, size: tuple[int, int], seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _image_bytes(size: tuple[int, int], seed: int, fmt: str) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def _assert_pixels(sample: dict, channels: int, size: int) -> None:
    pixels = sample["pixel_values"]
    assert pixels.dtype == torch.float32
    assert pixels.shape == (channels, size, size)
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0
    # Real content, not a constant fill: the scaling reached both ends of the range somewhere.
    assert pixels.max() - pixels.min() > 0.5


# ---------------------------------------------------------------- digits


def test_digits_splits_have_documented_sizes_and_partition_all():
    train, test, everything = (build_dataset("digits", split) for split in ("train", "test", "all"))
    assert (len(train), len(test), len(everything)) == (1497, 300, 1797)
    assert set(train.indices.tolist()).isdisjoint(test.indices.tolist())
    assert sorted(train.indices.tolist() + test.indices.tolist()) == list(range(1797))
    # Stratified: every digit keeps its share of the 300 test images.
    test_counts = np.bincount([test[i]["label"] for i in range(len(test))], minlength=10)
    assert test_counts.min() >= 28 and test_counts.max() <= 32
    assert train.tasks == {"digit": [str(d) for d in range(10)]} and train.default_task == "digit"
    assert all("{c}" in template for template in train.templates)


def test_digits_pixels_are_upsampled_ink_in_unit_range_and_deterministic():
    from sklearn.datasets import load_digits

    raw = load_digits()
    native = build_dataset("digits:8", "all")
    assert torch.allclose(native[7]["pixel_values"][0], torch.from_numpy(raw.images[7]).float() / 8 - 1)
    assert native[7]["label"] == int(raw.target[7])
    big = build_dataset("digits:16", "all")
    assert big.image_size == 16 and big.channels == 1
    _assert_pixels(big[3], 1, 16)
    stacked = torch.stack([big[i]["pixel_values"] for i in range(len(big))])
    assert stacked.min() >= -1 and stacked.max() <= 1
    assert torch.equal(
        build_dataset("digits", "test")[10]["pixel_values"], build_dataset("digits:16", "test")[10]["pixel_values"]
    )


def test_digits_sample_is_a_copy_of_the_cache():
    dataset = build_dataset("digits", "all")
    dataset[0]["pixel_values"].fill_(5.0)
    assert dataset[0]["pixel_values"].max() <= 1.0


@pytest.mark.parametrize("spec", ["digits:abc", "digits:0", "digits:4", "shapes:8", "shapes:-32"])
def test_bad_size_names_the_spec(spec):
    with pytest.raises(DataError, match=spec):
        build_dataset(spec)


def test_unknown_split_lists_the_known_ones():
    with pytest.raises(DataError, match="'val'.*train, test, all"):
        build_dataset("digits", "val")
    with pytest.raises(DataError, match="train, test"):
        build_dataset("shapes", "all")


# ---------------------------------------------------------------- shapes


def _shapes_digest(dataset) -> str:
    digest = hashlib.sha256()
    for i in range(len(dataset)):
        sample = dataset[i]
        digest.update(sample["pixel_values"].numpy().tobytes())
        digest.update(sample["caption"].encode())
    return digest.hexdigest()


_DIGEST_SCRIPT = (
    "import hashlib; from vlkd.data import build_dataset\n"
    "d = build_dataset('shapes:32', split='test'); h = hashlib.sha256()\n"
    "for i in range(len(d)):\n"
    "    s = d[i]; h.update(s['pixel_values'].numpy().tobytes()); h.update(s['caption'].encode())\n"
    "print(h.hexdigest())\n"
)


@pytest.mark.slow
def test_shapes_test_split_is_identical_in_separate_processes():
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _DIGEST_SCRIPT],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [process.communicate(timeout=120) for process in processes]
    assert all(process.returncode == 0 for process in processes), [err for _, err in outputs]
    in_process = _shapes_digest(build_dataset("shapes:32", split="test"))
    assert outputs[0][0].strip() == outputs[1][0].strip() == in_process


def test_shapes_samples_have_keys_shapes_and_metadata():
    train = build_dataset("shapes:32")
    assert train.unlimited and len(train) == 2**31 - 1
    sample = train[123]
    assert set(sample) == {"pixel_values", "label", "caption", "shape", "color", "shape_color"}
    _assert_pixels(sample, 3, 32)
    assert sample["label"] == sample["shape_color"] == sample["shape"] * 8 + sample["color"]
    assert train.tasks["shape_color"][sample["label"]] == " ".join(
        [train.tasks["color"][sample["color"]], train.tasks["shape"][sample["shape"]]]
    )
    assert train.default_task == "shape_color" and set(train.tasks) == {"shape_color", "shape", "color"}
    assert len(train.tasks["shape"]) >= 8 and len(train.tasks["color"]) >= 8
    for task, templates in train.task_templates.items():
        assert templates and all("{c}" in template for template in templates), task
    _assert_pixels(build_dataset("shapes:64", "test")[5], 3, 64)
    test = build_dataset("shapes", "test")
    assert not test.unlimited and len(test) == 2000 and test.image_size == 32
    with pytest.raises(IndexError):
        test[2000]


def test_shapes_train_sample_depends_only_on_seed_and_index():
    first, second = build_dataset("shapes:32"), build_dataset("shapes:32")
    later = first[50_000]["pixel_values"]
    # Drawing other samples first must not change sample 50,000: each index has its own random stream.
    for i in range(5):
        second[i]
    assert torch.equal(second[50_000]["pixel_values"], later)
    assert first[-1]["caption"] == second[2**31 - 2]["caption"]
    other_seed = build_dataset("shapes:32", seed=1)
    assert not torch.equal(other_seed[50_000]["pixel_values"], later)
    # The test split is fixed whatever seed a run uses.
    assert torch.equal(
        build_dataset("shapes", "test", seed=7)[3]["pixel_values"], build_dataset("shapes", "test")[3]["pixel_values"]
    )


@pytest.mark.slow
def test_shapes_train_and_test_images_never_coincide():
    test = build_dataset("shapes:32", "test")
    train = build_dataset("shapes:32", "train")

    def digest(sample):
        return hashlib.sha256(sample["pixel_values"].numpy().tobytes()).digest()

    test_hashes = {digest(test[i]) for i in range(len(test))}
    train_hashes = {digest(train[i]) for i in range(20_000)}
    assert len(test_hashes) == 2000 and len(train_hashes) == 20_000
    assert test_hashes.isdisjoint(train_hashes)


def test_shapes_captions_agree_with_labels_and_cover_the_vocabulary():
    vocab = shapes_vocabulary()
    test = build_dataset("shapes:32", "test")
    seen = {"shape": set(), "color": set(), "size": set(), "position": set()}
    for i in range(len(test)):
        sample = test[i]
        words = sample["caption"].split(" ")
        assert words[0] == "a"
        size, color, shape, position = words[1], words[2], words[3], " ".join(words[4:])
        assert vocab.shapes.index(shape) == sample["shape"], sample["caption"]
        assert vocab.colors.index(color) == sample["color"], sample["caption"]
        assert size in vocab.sizes and position in vocab.positions, sample["caption"]
        for key, value in (("shape", shape), ("color", color), ("size", size), ("position", position)):
            seen[key].add(value)
    assert len(seen["shape"]) >= 6 and len(seen["shape"]) == len(vocab.shapes)
    assert len(seen["color"]) >= 8 and len(seen["color"]) == len(vocab.colors)
    assert seen["size"] == set(vocab.sizes) and seen["position"] == set(vocab.positions)


def test_shapes_position_words_match_where_the_shape_is_drawn():
    vocab = shapes_vocabulary()
    test = build_dataset("shapes:32", "test")
    # Allowed range of the shape's bounding-box centre (fraction of the side) for grid row/column 0, 1, 2.
    allowed = {0: (0.0, 0.45), 1: (0.42, 0.58), 2: (0.55, 1.0)}
    for i in range(300):
        sample = test[i]
        pixels = sample["pixel_values"]
        # Shapes keep a margin from the border, so the top-left pixel is always background.
        mask = (pixels - pixels[:, :1, :1]).abs().amax(0) > 0.3
        rows, columns = torch.nonzero(mask, as_tuple=True)
        centre_row = (rows.min() + rows.max() + 1).item() / 2 / 32
        centre_column = (columns.min() + columns.max() + 1).item() / 2 / 32
        grid_row, grid_column = divmod(vocab.positions.index(" ".join(sample["caption"].split(" ")[4:])), 3)
        assert allowed[grid_row][0] < centre_row < allowed[grid_row][1], (sample["caption"], centre_row)
        assert allowed[grid_column][0] < centre_column < allowed[grid_column][1], (sample["caption"], centre_column)


# ---------------------------------------------------------------- file datasets


def test_imagefolder_labels_come_from_sorted_class_folders(tmp_path):
    for index, name in enumerate(["cat/a.png", "cat/b.jpg", "dog/c.PNG", "dog/nested/d.webp", "dog/notes.txt"]):
        path = tmp_path / name
        if name.endswith(".txt"):
            path.write_text("not an image")
        else:
            _write_image(path, (40 + 10 * index, 30), seed=index)
    dataset = build_dataset(f"imagefolder:{tmp_path}", image_size=24)
    assert len(dataset) == 4 and dataset.image_size == 24 and dataset.channels == 3
    assert dataset.tasks == {"class": ["cat", "dog"]} and dataset.default_task == "class"
    assert [dataset[i]["label"] for i in range(4)] == [0, 0, 1, 1]
    for i in range(4):
        _assert_pixels(dataset[i], 3, 24)
        assert "caption" not in dataset[i]
    grey = build_dataset(f"imagefolder:{tmp_path}", "test", channels="L", image_size=16)
    _assert_pixels(grey[0], 1, 16)


def test_imagefolder_without_subfolders_is_unlabelled(tmp_path):
    for index in range(3):
        _write_image(tmp_path / f"{index}.png", (20, 20), seed=index)
    dataset = build_dataset(f"imagefolder:{tmp_path}", "all")
    assert len(dataset) == 3 and dataset.tasks == {} and dataset.default_task is None and dataset.templates is None
    assert set(dataset[0]) == {"pixel_values"}
    _assert_pixels(dataset[2], 3, 32)
    # A 32 px image at image_size 32 comes back exactly, scaled to [-1, 1].
    _write_image(tmp_path / "0.png", (32, 32), seed=5)
    exact = torch.from_numpy(np.array(Image.open(tmp_path / "0.png"))).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.allclose(build_dataset(f"imagefolder:{tmp_path}")[0]["pixel_values"], exact)


def _write_csv(path: Path, rows: list[dict], separator: str) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter=separator)
        writer.writeheader()
        writer.writerows(rows)


def test_csv_reads_open_clip_format_with_relative_paths(tmp_path):
    _write_image(tmp_path / "images" / "one.png", (50, 40), seed=1)
    _write_image(tmp_path / "images" / "two.jpg", (30, 60), seed=2)
    _write_csv(
        tmp_path / "train.csv",
        [
            {"filepath": "images/one.png", "title": "a red thing"},
            {"filepath": "images/two.jpg", "title": "a blue, thing"},
        ],
        "\t",
    )
    dataset = build_dataset(f"csv:{tmp_path / 'train.csv'}", image_size=16)
    assert len(dataset) == 2 and dataset.tasks == {}
    assert [dataset[i]["caption"] for i in range(2)] == ["a red thing", "a blue, thing"]
    _assert_pixels(dataset[1], 3, 16)
    _write_csv(tmp_path / "custom.csv", [{"img": str(tmp_path / "images" / "one.png"), "text": "absolute"}], ",")
    custom = build_dataset(
        f"csv:{tmp_path / 'custom.csv'}", csv_img_key="img", csv_caption_key="text", csv_separator=","
    )
    assert custom[0]["caption"] == "absolute"
    _assert_pixels(custom[0], 3, 32)


def test_csv_without_caption_column_names_it_and_lists_columns(tmp_path):
    _write_image(tmp_path / "one.png", (20, 20), seed=1)
    _write_csv(tmp_path / "bad.csv", [{"filepath": "one.png", "caption": "x"}], "\t")
    with pytest.raises(DataError, match=r"bad\.csv has no column 'title' \(columns: 'filepath', 'caption'\)"):
        build_dataset(f"csv:{tmp_path / 'bad.csv'}")


def test_hf_dataset_saved_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets", reason="the 'datasets' package is not installed")
    images = [Image.open(io.BytesIO(_image_bytes((24 + i, 20), seed=i, fmt="PNG"))) for i in range(4)]
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "text": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["circle", "square"]),
        }
    )
    table = datasets.Dataset.from_dict(
        {"image": images, "text": [f"caption {i}" for i in range(4)], "label": [0, 1, 1, 0]}, features=features
    )
    table.save_to_disk(str(tmp_path / "flat"))
    dataset = build_dataset(f"hf:{tmp_path / 'flat'}", image_size=16)
    assert len(dataset) == 4 and dataset.tasks == {"class": ["circle", "square"]}
    assert [dataset[i]["label"] for i in range(4)] == [0, 1, 1, 0]
    assert dataset[2]["caption"] == "caption 2"
    _assert_pixels(dataset[3], 3, 16)

    datasets.DatasetDict({"train": table.select(range(3)), "test": table.select([3])}).save_to_disk(
        str(tmp_path / "dict")
    )
    assert len(build_dataset(f"hf:{tmp_path / 'dict'}", "test")) == 1
    assert len(build_dataset(f"hf:{tmp_path / 'dict'}", "all")) == 4
    renamed = table.rename_columns({"image": "picture", "text": "words"}).remove_columns("label")
    renamed.save_to_disk(str(tmp_path / "renamed"))
    custom = build_dataset(f"hf:{tmp_path / 'renamed'}", image_key="picture", caption_key="words")
    assert custom.tasks == {} and set(custom[1]) == {"pixel_values", "caption"} and custom[1]["caption"] == "caption 1"
    with pytest.raises(DataError, match="no column 'caption'.*image, text, label"):
        build_dataset(f"hf:{tmp_path / 'flat'}", caption_key="caption")


def _write_shard(path: Path, samples: list[dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as archive:
        for index, entries in enumerate(samples):
            for extension, payload in entries.items():
                info = tarfile.TarInfo(f"sample{path.stem}{index:03d}.{extension}")
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))


def test_wds_shards_are_indexed_in_order_with_captions_and_classes(tmp_path):
    for shard in range(2):
        _write_shard(
            tmp_path / f"{shard:03d}.tar",
            [
                {
                    "jpg" if i % 2 else "png": _image_bytes(
                        (30, 20), seed=10 * shard + i, fmt="JPEG" if i % 2 else "PNG"
                    ),
                    "txt": f"shard {shard} sample {i}".encode(),
                    "cls": str(shard * 3 + i).encode(),
                }
                for i in range(3)
            ],
        )
    dataset = build_dataset(f"wds:{tmp_path}/{{000..001}}.tar", image_size=16)
    assert len(dataset) == 6
    assert [dataset[i]["label"] for i in range(6)] == list(range(6))
    assert dataset[4]["caption"] == "shard 1 sample 1"
    assert dataset.tasks == {"class": [str(i) for i in range(6)]}
    _assert_pixels(dataset[5], 3, 16)
    # The bytes read by offset are the sample's own: a 16 px PNG comes back exactly.
    _write_shard(tmp_path / "exact.tar", [{"png": _image_bytes((16, 16), seed=99, fmt="PNG")}])
    exact_dataset = build_dataset(f"wds:{tmp_path}/exact.tar", image_size=16)
    expected = torch.from_numpy(np.array(Image.open(io.BytesIO(_image_bytes((16, 16), seed=99, fmt="PNG")))))
    assert torch.allclose(exact_dataset[0]["pixel_values"], expected.permute(2, 0, 1).float() / 127.5 - 1)
    assert exact_dataset.tasks == {} and set(exact_dataset[0]) == {"pixel_values"}


def test_wds_rejects_missing_and_compressed_shards(tmp_path):
    with pytest.raises(DataError, match=r"missing\.tar does not exist"):
        build_dataset(f"wds:{tmp_path}/missing.tar")
    with tarfile.open(tmp_path / "packed.tar", "w:gz") as archive:
        info = tarfile.TarInfo("a.txt")
        info.size = 1
        archive.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(DataError, match=r"packed\.tar.*uncompressed"):
        build_dataset(f"wds:{tmp_path}/packed.tar")


# ---------------------------------------------------------------- errors


def test_missing_and_empty_image_folders_name_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=str(missing)):
        build_dataset(f"imagefolder:{missing}")
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match=f"{tmp_path / 'empty'} holds no images"):
        build_dataset(f"imagefolder:{tmp_path / 'empty'}")


def test_corrupt_image_is_named_at_build_and_at_load(tmp_path):
    _write_image(tmp_path / "cat" / "good.png", (20, 20), seed=0)
    (tmp_path / "cat" / "x.png").write_bytes(b"this is not a png at all")
    bad = tmp_path / "cat" / "x.png"
    with pytest.raises(DataError, match=f"cannot read image {bad}"):
        build_dataset(f"imagefolder:{tmp_path}")
    unchecked = build_dataset(f"imagefolder:{tmp_path}", verify=False)
    _assert_pixels(unchecked[0], 3, 32)
    with pytest.raises(DataError, match=f"cannot read image {bad}"):
        unchecked[1]


def test_unknown_spec_and_option_are_errors():
    with pytest.raises(DataError, match="'cifar10'.*digits:, shapes:, imagefolder:, csv:, hf:, wds:"):
        build_dataset("cifar10")
    with pytest.raises(DataError, match="does not take option.*csv_separator"):
        build_dataset("digits", csv_separator=",")
    with pytest.raises(DataError, match="asks for size 16 but image_size=32"):
        build_dataset("digits:16", image_size=32)
    assert build_dataset("digits", image_size=24).image_size == 24


# ---------------------------------------------------------------- info, assets, collate


def test_dataset_info_matches_the_built_dataset():
    info = dataset_info("shapes:64")
    assert info["image_size"] == 64 and info["channels"] == 3 and info["unlimited"]
    assert info["tasks"]["color"][0] == "red" and info["templates"] == info["task_templates"]["shape_color"]
    assert dataset_info("digits", "test")["length"] == 300


def test_assets_dir_points_at_the_repository_and_can_be_overridden(monkeypatch, tmp_path):
    monkeypatch.delenv("VLKD_ASSETS", raising=False)
    assert assets_dir() == REPO_ROOT / "assets"
    assert (assets_dir() / "datasets" / "shapes.json").is_file()
    monkeypatch.setenv("VLKD_ASSETS", str(tmp_path))
    assert assets_dir() == tmp_path


def test_collate_stacks_tensors_and_ints_and_keeps_strings():
    dataset = build_dataset("shapes:32")
    batch = collate([dataset[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    assert batch["label"].dtype == torch.int64 and batch["label"].tolist() == [dataset[i]["label"] for i in range(4)]
    assert batch["caption"] == [dataset[i]["caption"] for i in range(4)]
    with pytest.raises(DataError, match="different keys"):
        collate([dataset[0], build_dataset("digits")[0]])
    loader = torch.utils.data.DataLoader(build_dataset("digits", "test"), batch_size=8, collate_fn=collate)
    first = next(iter(loader))
    assert first["pixel_values"].shape == (8, 1, 16, 16) and first["label"].shape == (8,)
