"""Check vlkd's attention backends on a CUDA GPU against the float32 math reference, in float16 and bfloat16.

Prints the GPU, then a markdown table: max abs error against ``math`` (computed in float32), median time and
peak extra GPU memory per backend and case. Exits 1 if an error exceeds its dtype's tolerance, 0 otherwise,
and 0 with a message when there is no CUDA device.

    python scripts/check_cuda_kernels.py [--out table.md]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vlkd.errors import BackendUnavailableError  # noqa: E402
from vlkd.kernels import attention, auto_backend  # noqa: E402

# Outputs are averages of N(0, 1) values; these bound the rounding of 16-bit inputs and outputs.
TOLERANCE = {torch.float16: 4e-3, torch.bfloat16: 3e-2}
# (batch, heads, seq, head_dim, mask)
CASES = [
    (2, 8, 1024, 64, "none"),
    (2, 8, 1024, 64, "causal"),
    (2, 8, 1024, 64, "key padding (bool)"),
    (2, 8, 1024, 64, "float bias"),
    (2, 8, 1024, 80, "none"),
    (1, 8, 8192, 64, "causal"),
]
BACKENDS = ("sdpa", "xformers", "chunked", "auto")


def _inputs(batch, heads, seq, head_dim, mask, dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(batch, heads, seq, head_dim, device="cuda", generator=gen, dtype=dtype) for _ in range(3))
    kwargs = {"is_causal": mask == "causal"}
    if mask == "key padding (bool)":
        keep = torch.ones(batch, 1, 1, seq, dtype=torch.bool, device="cuda")
        keep[0, ..., seq // 2 :] = False
        kwargs["attn_mask"] = keep
    if mask == "float bias":
        kwargs["attn_mask"] = torch.randn(1, heads, seq, seq, device="cuda", generator=gen, dtype=dtype)
    return q, k, v, kwargs


def _timed(fn, repeats: int = 10) -> tuple[torch.Tensor, float, float]:
    """Output, median milliseconds and peak extra MiB of ``fn`` on the GPU."""
    out = fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return out, statistics.median(times), (torch.cuda.max_memory_allocated() - base) / (1 << 20)


def _check_case(batch, heads, seq, head_dim, mask, dtype, failures: list[str]) -> list[str]:
    """Table rows for one case, each backend against the float32 math reference; appends failures."""
    q, k, v, kwargs = _inputs(batch, heads, seq, head_dim, mask, dtype)
    reference = attention(q.float(), k.float(), v.float(), backend="math", **kwargs)
    shape = f"{batch} x {heads} x {seq} x {head_dim}"
    rows = []
    for backend in BACKENDS:
        label = backend if backend != "auto" else f"auto ({auto_backend(q, k, v, **kwargs)})"
        try:
            out, ms, mib = _timed(lambda b=backend: attention(q, k, v, backend=b, **kwargs))
        except BackendUnavailableError as err:
            rows.append(f"| {dtype} | {shape} | {mask} | {label} | unavailable: {err} | | |")
            continue
        error = (out.float() - reference).abs().max().item()
        if not error <= TOLERANCE[dtype]:
            failures.append(f"{dtype} {shape} {mask} {backend}: {error:.2e} > {TOLERANCE[dtype]:.0e}")
        rows.append(f"| {dtype} | {shape} | {mask} | {label} | {error:.2e} | {ms:.3f} | {mib:,.0f} |")
    return rows


def _unet_rows(dtype: torch.dtype) -> list[str]:
    """A UNet2DConditionModel forward at 64x64 latents (batch 8) under diffusers' default processor and vlkd's
    backends: median ms, and the largest output difference from the default."""
    from diffusers import UNet2DConditionModel

    from vlkd.kernels import restore_attention, use_attention

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8,
    ).to("cuda", dtype).eval()
    latents = torch.randn(8, 4, 64, 64, device="cuda", dtype=dtype)
    context = torch.randn(8, 77, 768, device="cuda", dtype=dtype)

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return unet(latents, 500, context).sample

    reference, reference_ms, _ = _timed(forward)
    rows = [f"| {dtype} | diffusers default (AttnProcessor2_0) | {reference_ms:.2f} | - |"]
    for backend in ("auto", "sdpa", "xformers", "chunked"):
        try:
            use_attention(unet, backend)
            out, ms, _ = _timed(forward)
            rows.append(f"| {dtype} | vlkd {backend} | {ms:.2f} | {(out - reference).abs().max().item():.2e} |")
        except BackendUnavailableError as err:
            rows.append(f"| {dtype} | vlkd {backend} | unavailable: {err} | |")
        finally:
            restore_attention(unet)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the table to this markdown file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check (this script needs a GPU)")
        return 0
    try:
        import xformers

        xformers_version = xformers.__version__
    except ImportError:
        xformers_version = "not installed"
    lines = [
        f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}; xformers {xformers_version}",
        "",
        "| dtype | batch x heads x seq x head_dim | mask | backend | max abs error vs math | ms | peak extra MiB |",
        "| --- | --- | --- | --- | ---: | ---: | ---: |",
    ]
    failures: list[str] = []
    for dtype in TOLERANCE:
        for case in CASES:
            lines += _check_case(*case, dtype, failures)
            torch.cuda.empty_cache()
    lines += ["", "UNet2DConditionModel (320, 640) forward, batch 8, 64x64 latents (4,096 tokens), 77 context tokens:", "",
              "| dtype | attention | ms | max abs difference from default |", "| --- | --- | ---: | ---: |"]
    for dtype in TOLERANCE:
        lines += _unet_rows(dtype)
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    for failure in failures:
        print(f"FAIL {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
