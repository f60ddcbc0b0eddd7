"""`vlkd bench`: a benchmark script writes its table with date, machine, versions and command; the README's
figures table is read from those files and written between its markers."""

from __future__ import annotations

import re

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
