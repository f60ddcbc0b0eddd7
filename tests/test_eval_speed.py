"""Latency, throughput and peak memory: warm-up calls are not timed, figures come from the median of the repeats,
images/s is the batch over the median, and the image-encoder helper times CLIP image towers and plain modules."""

from __future__ import annotations

import time
import types

import numpy as np
import pytest
import torch

from vlkd.errors import EvalError
from vlkd.eval import speed
from vlkd.eval.speed import image_encoder_latency, measure_latency, measure_peak_memory, throughput

MB = 1 << 20



class ScriptedCalls:
    """A function whose calls take the given (fake) durations, and the clock that sees them."""

    def __init__(self, durations: list[float]) -> None:
        self.now = 0.0
        self.durations = iter(durations)
        self.calls = 0

    def perf_counter(self) -> float:
        return self.now

    def __call__(self) -> None:
        self.calls += 1
        self.now += next(self.durations)


@pytest.fixture
def scripted(monkeypatch):
    def install(durations: list[float]) -> ScriptedCalls:
        calls = ScriptedCalls(durations)
        monkeypatch.setattr(speed, "time", types.SimpleNamespace(perf_counter=calls.perf_counter))
        return calls

    return install


def test_latency_skips_the_warm_up_and_takes_the_median(scripted):
    calls = scripted([100.0, 100.0, 1.0, 5.0, 2.0, 4.0, 3.0])  # two slow warm-up calls, then the timed repeats
    result = measure_latency(calls, warmup=2, repeats=5)
    assert calls.calls == 7
    assert (result["median_s"], result["mean_s"], result["min_s"], result["repeats"]) == (3.0, 3.0, 1.0, 5)
    assert result["p90_s"] == pytest.approx(float(np.percentile([1, 5, 2, 4, 3], 90)))
    no_warmup = scripted([7.0, 1.0, 2.0])
    assert measure_latency(no_warmup, warmup=0, repeats=3)["median_s"] == 2.0 and no_warmup.calls == 3


def test_throughput_is_items_over_the_median_latency(scripted):
    calls = scripted([50.0, 0.5, 0.25, 4.0])
    result = throughput(calls, 64, warmup=1, repeats=3)
    assert result["median_s"] == 0.5 and result["items_per_s"] == 128.0 and result["items_per_call"] == 64
    assert calls.calls == 4


@pytest.mark.parametrize("warmup, repeats", [(2, 0), (2, -1), (-1, 3)])
def test_bad_repeat_or_warm_up_counts_are_errors(warmup, repeats):
    def never() -> None:
        raise AssertionError("must not run")

    for measure in (lambda: measure_latency(never, warmup=warmup, repeats=repeats),
                    lambda: throughput(never, 8, warmup=warmup, repeats=repeats)):
        with pytest.raises(EvalError, match=r"repeats >= 1 and warmup >= 0") as error:
            measure()
        assert "\n" not in str(error.value)


def test_latency_of_a_real_call_is_positive_and_ordered():
    result = measure_latency(lambda: time.sleep(0.002), warmup=1, repeats=3)
    assert 0.002 <= result["min_s"] <= result["median_s"] <= result["p90_s"]


def test_peak_memory_counts_what_the_call_needed_not_the_lifetime_peak():
    def allocate(megabytes: int) -> None:
        block = torch.ones(megabytes * MB // 4)  # float32, every page written
        time.sleep(0.05)  # long enough for the RSS sampler to see it
        del block

    assert measure_peak_memory(lambda: allocate(96)) >= 64 * MB
    assert measure_peak_memory(lambda: allocate(0)) < 32 * MB  # after a bigger call: relative to now, not ever


class TinyEncoder(torch.nn.Module):
    image_size = 16

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(pixels.shape))
        return self.conv(pixels).mean((2, 3))


def test_image_encoder_latency_of_a_plain_module():
    encoder = TinyEncoder()
    result = image_encoder_latency(encoder, batch_size=4, warmup=1, repeats=3)
    # Warm-up, repeats, then one more call for the peak memory.
    assert encoder.shapes == [(4, 3, 16, 16)] * 5
    assert (result["batch_size"], result["image_size"], result["device"]) == (4, 16, "cpu")
    assert result["images_per_s"] == pytest.approx(4 / result["median_s"])
    assert isinstance(result["peak_memory_bytes"], int) and result["median_s"] <= result["p90_s"]
    image_encoder_latency(encoder, batch_size=2, image_size=8, channels=3, warmup=0, repeats=1)
    assert encoder.shapes[-1] == (2, 3, 8, 8)
    with pytest.raises(EvalError, match="pass image_size="):
        image_encoder_latency(torch.nn.Conv2d(3, 4, 1), repeats=1)


def test_image_encoder_latency_times_the_image_tower_of_clip_models():
    import open_clip
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    tiny_open_clip = open_clip.CLIP(
        embed_dim=16, vision_cfg={"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
        text_cfg={"context_length": 8, "vocab_size": 32, "width": 32, "heads": 2, "layers": 1})
    tiny_transformers = CLIPModel(CLIPConfig(
        text_config={"vocab_size": 32, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 8, "pad_token_id": 0, "bos_token_id": 1,
                     "eos_token_id": 2},
        vision_config={"image_size": 24, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 1, "num_attention_heads": 2},
        projection_dim=16))
    for model, size in ((tiny_open_clip, 32), (tiny_transformers, 24)):
        seen = []
        patch_embedding = "visual.conv1" if model is tiny_open_clip else "vision_model.embeddings.patch_embedding"
        model.get_submodule(patch_embedding).register_forward_hook(
            lambda module, args, output: seen.append(tuple(args[0].shape)))
        result = image_encoder_latency(model.eval(), batch_size=3, warmup=1, repeats=2)
        assert result["image_size"] == size and result["images_per_s"] == pytest.approx(3 / result["median_s"])
        assert seen == [(3, 3, size, size)] * 4
