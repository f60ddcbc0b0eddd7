"""Time and measure the memory of vlkd's attention backends on CPU; print a markdown table and write it to
benchmarks/attention.md.

Every case runs in a fresh Python process so that its peak memory is its own: the process builds its inputs,
resets the kernel's peak-RSS counter (/proc/self/clear_refs), runs, and reports VmHWM minus the RSS it had
before running. Times are medians of a few runs (one warm-up where affordable).

    python scripts/bench_attention.py            # ~5-10 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from vlkd.files import atomic_file

REPO = Path(__file__).resolve().parent.parent
OUTPUT = REPO / "benchmarks" / "attention.md"
CUDA_RECORD = REPO / "benchmarks" / "attention-cuda.md"
THREADS = 2
HEADS, HEAD_DIM = 8, 64
SEQS = (1024, 4096, 16384)
REPEATS = {1024: 5, 4096: 3, 16384: 2}
MIB = 1 << 20
SMALL_CAP = 128 * MIB  # cap for the cases that show auto's routing and chunked at a modest budget
MATH_16K_NEEDS_GIB = 20  # measure math at 16,384 only with this much memory available


# --- inside the measuring process -----------------------------------------------------------------------------


def _proc_status_mib(key: str) -> float:
    with open("/proc/self/status") as status:
        return int(re.search(rf"^{key}:\s+(\d+) kB", status.read(), re.M).group(1)) / 1024


def _measure(step, repeats: int, warmup: bool) -> dict:
    if warmup:
        step()
    rss_before = _proc_status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current RSS
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "peak_mib": _proc_status_mib("VmHWM") - rss_before}


def _attention_case(case: dict) -> dict:
    import torch

    from vlkd.kernels import attention, auto_backend

    seq, variant = case["seq"], case["variant"]
    # Inputs are drawn in place so that building them leaves no transient peak behind.
    q, k = (torch.empty(1, HEADS, seq, HEAD_DIM).normal_() for _ in range(2))
    v = torch.empty(1, HEADS, seq, 32 if variant == "value head_dim 32" else HEAD_DIM).normal_()
    kwargs = {}
    if variant == "boolean causal mask":
        kwargs["attn_mask"] = torch.ones(seq, seq, dtype=torch.bool).tril()
    if variant == "dropout 0.1":
        kwargs["dropout_p"] = 0.1
    if variant == "learned key bias, fwd+bwd":
        kwargs["attn_mask"] = torch.zeros(1, 1, 1, seq, requires_grad=True)
    backward = variant.endswith("fwd+bwd")
    if backward:
        for t in (q, k, v):
            t.requires_grad_(True)

    def step():
        out = attention(q, k, v, backend=case["backend"], **kwargs)
        if backward:
            out.sum().backward()

    result = _measure(step, case["repeats"], warmup=case["warmup"])
    result["auto_choice"] = auto_backend(q, k, v, **kwargs)
    return result


def _unet_case(case: dict) -> dict:
    import torch
    from diffusers import UNet2DConditionModel

    from vlkd.kernels import use_attention

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
    ).eval()
    if case["processor"] != "default":
        use_attention(unet, case["processor"])
    latents, context = torch.randn(2, 4, 64, 64), torch.randn(2, 77, 64)

    def step():
        with torch.no_grad():
            unet(latents, 500, context)

    return _measure(step, case["repeats"], warmup=True)


def _run_case_here(case: dict) -> None:
    import torch

    torch.set_num_threads(THREADS)
    result = _unet_case(case) if case["kind"] == "unet" else _attention_case(case)
    print(json.dumps(result))


# --- the driver -----------------------------------------------------------------------------------------------


def _run_case(case: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if case.get("cap"):
        env["VLKD_MAX_ATTENTION_BYTES"] = str(case["cap"])
    proc = subprocess.run(
        [sys.executable, __file__, "--case", json.dumps(case)], env=env, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"case {case} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  {case} -> {result}", file=sys.stderr, flush=True)
    return result


def _mem_available_gib() -> float:
    with open("/proc/meminfo") as meminfo:
        return int(re.search(r"^MemAvailable:\s+(\d+) kB", meminfo.read(), re.M).group(1)) / (1 << 20)


def _cpu_model() -> str:
    with open("/proc/cpuinfo") as cpuinfo:
        found = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read(), re.M)
    return found.group(1).strip() if found else platform.processor()


def _fmt_row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _seconds(s: float) -> str:
    return f"{s:.3f}" if s < 10 else f"{s:.1f}"


def _backend_table() -> tuple[list[str], dict]:
    lines = [
        f"### Attention alone: batch 1, {HEADS} heads, head_dim {HEAD_DIM}, float32, forward, no mask",
        "",
        _fmt_row(["seq", "score matrix (MiB)", "backend", "median s", "peak extra memory (MiB)", "auto chose"]),
        _fmt_row(["---:", "---:", "---", "---:", "---:", "---"]),
    ]
    results = {}
    for seq in SEQS:
        for backend in ("math", "sdpa", "chunked", "auto"):
            case = {
                "kind": "attention",
                "seq": seq,
                "variant": "plain",
                "backend": backend,
                "repeats": 1 if (seq == 16384 and backend in ("math", "chunked")) else REPEATS[seq],
                "warmup": seq < 16384,
            }
            note = ""
            if seq == 16384 and backend == "math" and _mem_available_gib() < MATH_16K_NEEDS_GIB:
                small = results[(4096, "math")]
                result = {"seconds": small["seconds"] * 16, "peak_mib": small["peak_mib"] * 16, "auto_choice": "-"}
                note = " (extrapolated x16 from 4,096: not enough free memory to measure)"
            else:
                result = _run_case(case)
            results[(seq, backend)] = result
            score_mib = HEADS * seq * seq * 4 / MIB
            lines.append(
                _fmt_row(
                    [
                        f"{seq:,}",
                        f"{score_mib:,.0f}",
                        backend + note,
                        _seconds(result["seconds"]),
                        f"{result['peak_mib']:,.0f}",
                        result["auto_choice"] if backend == "auto" else "",
                    ]
                )
            )
    return lines, results


def _routing_table() -> list[str]:
    seq = 4096
    lines = [
        f"### Where SDPA materialises the score matrix, and what auto does (seq {seq:,}, cap {SMALL_CAP // MIB} MiB)",
        "",
        f"Score matrix {HEADS * seq * seq * 4 // MIB} MiB. `VLKD_MAX_ATTENTION_BYTES={SMALL_CAP}` for every row, "
        "so auto may route to chunked and chunked works in blocks of that budget.",
        "",
        _fmt_row(["case", "backend", "median s", "peak extra memory (MiB)", "auto chose"]),
        _fmt_row(["---", "---", "---:", "---:", "---"]),
    ]
    cases = [
        ("boolean causal mask", ("sdpa", "auto")),
        ("fwd+bwd", ("sdpa", "auto", "chunked")),
        ("dropout 0.1", ("sdpa", "auto")),
        ("value head_dim 32", ("sdpa", "auto")),
        ("learned key bias, fwd+bwd", ("sdpa", "auto")),
    ]
    for variant, backends in cases:
        for backend in backends:
            case = {
                "kind": "attention",
                "seq": seq,
                "variant": variant,
                "backend": backend,
                "repeats": 2,
                "warmup": False,
                "cap": SMALL_CAP,
            }
            result = _run_case(case)
            lines.append(
                _fmt_row(
                    [
                        variant,
                        backend,
                        _seconds(result["seconds"]),
                        f"{result['peak_mib']:,.0f}",
                        result["auto_choice"] if backend == "auto" else "",
                    ]
                )
            )
    return lines


def _unet_table() -> tuple[list[str], dict]:
    lines = [
        "### UNet2DConditionModel forward, batch 2, 64x64 latents (4,096 tokens in the top attention), float32",
        "",
        "block_out_channels (32, 64), CrossAttnDownBlock2D + DownBlock2D, cross_attention_dim 64, "
        "attention_head_dim 8, 77 context tokens; no grad. Each row: two fresh processes, interleaved, "
        "5 timed forwards each after a warm-up; median over the 10.",
        "",
        _fmt_row(["attention", "median s", "peak extra memory (MiB)"]),
        _fmt_row(["---", "---:", "---:"]),
    ]
    variants = {"default": None, "auto": None, "chunked": SMALL_CAP}
    labels = {
        "default": "diffusers default processor (AttnProcessor2_0)",
        "auto": "vlkd auto",
        "chunked": f"vlkd chunked (cap {SMALL_CAP // MIB} MiB)",
    }
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for _ in range(2):
        for name, cap in variants.items():
            case = {"kind": "unet", "processor": name, "repeats": 5, "cap": cap}
            runs[name].append(_run_case(case))
    results = {}
    for name in variants:
        results[name] = {
            "seconds": statistics.median([r["seconds"] for r in runs[name]]),
            "peak_mib": max(r["peak_mib"] for r in runs[name]),
        }
        lines.append(_fmt_row([labels[name], _seconds(results[name]["seconds"]), f"{results[name]['peak_mib']:,.0f}"]))
    return lines, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=OUTPUT, help=f"markdown file to write (default: {OUTPUT})")
    args = parser.parse_args()
    if args.case:
        _run_case_here(json.loads(args.case))
        return

    import diffusers
    import torch

    started = time.perf_counter()
    backend_lines, backend_results = _backend_table()
    routing_lines = _routing_table()
    unet_lines, unet_results = _unet_table()
    math_16k, chunked_16k = backend_results[(16384, "math")], backend_results[(16384, "chunked")]
    memory_ratio = math_16k["peak_mib"] / chunked_16k["peak_mib"]
    slowdown = unet_results["auto"]["seconds"] / unet_results["default"]["seconds"] - 1
    header = [
        "# Attention backends (CPU)",
        "",
        f"- date: {datetime.date.today().isoformat()}",
        f"- machine: {_cpu_model()}, {os.cpu_count()} cores, torch threads {THREADS}",
        f"- torch {torch.__version__}, diffusers {diffusers.__version__}, Python {platform.python_version()}",
        "- command: `python scripts/bench_attention.py`",
        "- memory: peak RSS of a fresh process while running, minus its RSS after building the inputs/model",
        "- default memory cap (auto's threshold, chunked's block budget): 1 GiB unless a table says otherwise",
        f"- total benchmark time: {time.perf_counter() - started:.0f} s",
        "",
        "## Acceptance",
        "",
        f"- chunked peak memory at seq 16,384 is 1/{memory_ratio:.0f} of math's "
        f"({chunked_16k['peak_mib']:,.0f} vs {math_16k['peak_mib']:,.0f} MiB; target: at most 1/8)",
        f"- vlkd auto vs diffusers' default processor on the UNet: {slowdown:+.1%} time (target: at most +5%)",
        "",
    ]
    text = "\n".join(header + backend_lines + [""] + routing_lines + [""] + unet_lines) + "\n"
    if CUDA_RECORD.is_file():  # written on a GPU machine by scripts/check_cuda_kernels.py; kept verbatim
        text += "\n#" + CUDA_RECORD.read_text()
    with atomic_file(args.out, "w") as handle:
        handle.write(text)
    print(text)


if __name__ == "__main__":
    main()
