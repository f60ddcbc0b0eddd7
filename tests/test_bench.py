"""`vlkd bench`: a benchmark script writes its table with date, machine, versions and command; the README's
figures table is read from those files and written between its markers."""

from __future__ import annotations

import re

import pytest
from script_modules import load_script

from vlkd import bench
from vlkd.cli import main


def test_quick_shapes_benchmark_feeds_the_readme_table(tmp_path, capsys):
    assert main(["bench", "shapes", "--quick", "--out", str(tmp_path / "benchmarks")]) == 0
    text = (tmp_path / "benchmarks" / "shapes.md").read_text()
    for field in ("- date: ", "- machine: ", "- Python ", "- command: `python scripts/bench_shapes.py --sizes 32"):
        assert field in text
    rate = re.search(r"^\| 32 \| ([\d,]+) \|", text, re.MULTILINE)[1]
    (tmp_path / "README.md").write_text(f"# x\n\n{bench.FIGURES_START}\nold\n{bench.FIGURES_END}\n\nrest\n")
    bench.update_readme(tmp_path)
    readme = (tmp_path / "README.md").read_text()
    assert f"| `shapes:32` drawn, one thread | {rate} images/s |" in readme
    assert "old" not in readme and readme.endswith("rest\n")


def test_unknown_benchmark_is_one_line(capsys):
    assert main(["bench", "fancy"]) == 2
    assert "unknown benchmark 'fancy'" in capsys.readouterr().err


def test_lcm_memory_benchmark_on_a_tiny_teacher(tmp_path):
    """scripts/bench_lcm.py with --teacher: each pipeline's run in its own process, after one that fills the
    encoder cache; the table has a row per pipeline with a positive peak."""
    from lcm_fixtures import save_teacher

    assert bench.BENCHMARKS["lcm"].quick is None  # it needs a text-to-image teacher folder
    teacher = save_teacher(tmp_path / "teacher")
    module = load_script("bench_lcm")
    out = tmp_path / "lcm.md"
    module.main(["--teacher", str(teacher), "--steps", "2", "--batch-size", "2", "--pool-size", "32", "--threads",
                 "1", "--out", str(out)])
    text = out.read_text()
    assert f"- command: `python scripts/bench_lcm.py --teacher {teacher} --steps 2" in text
    assert "a pool of 32 read from a cache filled beforehand" in text and "## Teacher: " in text
    runtime = float(re.search(r"^- runtime alone \(imports, nothing loaded\): ([\d,]+) MiB peak", text,
                              re.MULTILINE)[1].replace(",", ""))
    peaks, above_runtime = {}, {}
    for name in ("lcm", "lcm-lora"):
        row = re.search(rf"^\| {name} \| ([\d,]+) \| (-?[\d,]+) \| (\d+) \|$", text, re.MULTILINE)
        assert row is not None, text
        peaks[name] = float(row[1].replace(",", ""))
        above_runtime[name] = row[2]
        assert peaks[name] > 0 and float(row[2].replace(",", "")) == pytest.approx(peaks[name] - runtime, abs=1)
    assert re.search(r"^- LCM-LoRA training memory is [\d.]+ of full LCM's", text, re.MULTILINE)
    (figure, value), = bench.FIGURES["lcm"](text, str(out))  # what the README's table would copy
    # the table's own column, not a difference of rounded figures, which can be off by one
    assert "batch 2" in figure and value.startswith(f"{above_runtime['lcm-lora']} vs {above_runtime['lcm']} MiB")


def test_sd15_architecture_teacher_loads_as_a_text_to_image_teacher(tmp_path):
    """The memory benchmark's second teacher: SD 1.5's UNet layout (four levels, two ResNets each, cross-attention
    768) at a width fraction, its text encoder's width, the shipped VAE: vlkd loads it as a teacher."""
    from vlkd.diffusion.text_teacher import load_text_to_image_teacher

    module = load_script("bench_lcm")
    folder, parameters = module.save_sd15_architecture_teacher(tmp_path / "sd", width=0.1)
    teacher = load_text_to_image_teacher(folder)
    assert parameters == sum(parameter.numel() for parameter in teacher.unet.parameters())
    assert teacher.unet.config.block_out_channels == [32, 64, 128, 128]
    assert teacher.unet.config.layers_per_block == 2 and teacher.unet.config.cross_attention_dim == 768
    assert teacher.pipeline.text_encoder.config.hidden_size == 768 and teacher.image_size == 32
