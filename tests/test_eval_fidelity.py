"""Prompt fidelity: images generated for shapes captions, judged zero-shot by the shipped shapes CLIP teacher."""

import json

import numpy as np
import pytest
import torch

from vlkd.data import build_dataset
from vlkd.data.builtin_shapes import shapes_test_set, shapes_vocabulary
from vlkd.errors import EvalError
from vlkd.eval.fidelity import default_judge, prompt_fidelity, shapes_prompts, shapes_validation
from vlkd.eval.sources import PipelineSource
from vlkd.eval.zeroshot import load_clip

NUM = 300


@pytest.fixture(scope="module")
def judge():
    return load_clip(default_judge(), device="cpu")


class DrawingPipeline:
    """A stand-in text-to-image pipeline: returns the real test image of each prompt it is given (or, with
    ``ignore_prompt``, always the first test image), as diffusers' ``output_type="np"`` does."""

    def __init__(self, ignore_prompt: bool = False):
        test = shapes_test_set(32)
        self.by_caption = {caption: test.pixels[i].numpy() for i, caption in reversed(list(enumerate(test.captions)))}
        self.first = test.pixels[0].numpy()
        self.ignore_prompt = ignore_prompt
        self.components = {}

    def to(self, device):
        return self

    def set_progress_bar_config(self, **kwargs):
        pass

    def __call__(self, prompt, generator, output_type, num_inference_steps=None, guidance_scale=None):
        images = [self.first if self.ignore_prompt else self.by_caption[text] for text in prompt]

        class Output:
            pass

        output = Output()
        output.images = np.stack(images).astype(np.float32) / 255.0
        return output


def test_real_test_images_score_the_judges_accuracy(judge):
    result = prompt_fidelity("shapes:32@test", shapes_prompts(NUM), judge, batch_size=128)
    assert result["num_images"] == NUM
    assert result["fidelity"] >= 0.99 and result["color_accuracy"] >= 0.99
    assert result["fidelity"] <= min(result["shape_accuracy"], result["color_accuracy"])


def test_images_paired_with_the_wrong_captions_score_low(judge):
    prompts = shapes_prompts(NUM)
    pixels = shapes_test_set(32).pixels[:NUM].roll(1, dims=0).permute(0, 3, 1, 2).contiguous()
    result = prompt_fidelity(pixels, prompts, judge, batch_size=128)
    # Shape and colour are drawn independently and uniformly: about 1 in 64 shifted pairs match by chance.
    assert result["fidelity"] < 0.1 and result["shape_accuracy"] < 0.3 and result["color_accuracy"] < 0.3


@pytest.mark.parametrize("ignore_prompt", [False, True])
def test_a_pipeline_source_pairs_each_image_with_its_prompt(judge, ignore_prompt):
    prompts = shapes_prompts(NUM)
    source = PipelineSource(DrawingPipeline(ignore_prompt), NUM, prompts=prompts.captions, device="cpu",
                            progress=False)
    result = prompt_fidelity(source, prompts, judge, batch_size=64)  # 64 does not divide 300: a partial batch
    if ignore_prompt:
        assert result["fidelity"] < 0.1
    else:
        assert result["fidelity"] >= 0.99
    assert result["seconds_per_image"] is not None


def test_more_captions_than_the_test_split_is_refused():
    with pytest.raises(EvalError, match="between 1 and 2000"):
        shapes_prompts(2001)


def test_the_validation_split_is_a_train_stream_the_teachers_never_drew(judge):
    prompts, reference = shapes_validation(40, reference=80)
    assert len(prompts.captions) == 40 and reference.count() == 80
    images = torch.cat(list(reference.batches(80)))
    test, stream0 = shapes_test_set(32).pixels, build_dataset("shapes:32", "train")
    assert not any(torch.equal(images[0].permute(1, 2, 0), pixels) for pixels in test)
    assert not torch.equal(images[0], ((stream0[0]["pixel_values"] + 1) * 127.5).round().to(torch.uint8))
    # Image i of the reference is the one caption i describes, and its labels are the caption's.
    assert prompt_fidelity(images[:40], prompts, judge)["fidelity"] >= 0.9
    vocab = shapes_vocabulary()
    assert all(vocab.shapes[s] in c and vocab.colors[k] in c
               for c, s, k in zip(prompts.captions, prompts.shapes.tolist(), prompts.colors.tolist()))
    with pytest.raises(EvalError, match="between 1 and 80"):
        shapes_validation(81, reference=80)


def test_fewer_images_than_captions_is_refused(judge):
    pixels = shapes_test_set(32).pixels[:10].permute(0, 3, 1, 2).contiguous()
    with pytest.raises(EvalError, match="one image per caption"):
        prompt_fidelity(pixels, shapes_prompts(20), judge)


def test_cli_fidelity_of_the_real_images(tmp_path, capsys):
    from vlkd.cli import main

    out = tmp_path / "fidelity.json"
    assert main(["eval", "fidelity", "--samples", "shapes:32@test", "--num", "100", "--device", "cpu",
                 "--out", str(out)]) == 0
    assert "| prompt_fidelity | shapes:32@test |" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["num_images"] == 100 and result["fidelity"] >= 0.99

    assert main(["eval", "fidelity", "--samples", "digits:16@all", "--num", "10", "--device", "cpu"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "text-to-image pipeline folder" in error[-1]
