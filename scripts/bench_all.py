"""Run every benchmark (or those named), write benchmarks/*.md, and copy the README's figures table from them.

    python scripts/bench_all.py              # all; ~20 minutes on 2 CPU cores
    python scripts/bench_all.py shapes eval  # some

The same as `vlkd bench`; see vlkd/bench.py for the list and for how the README table is read from the files.
"""

from __future__ import annotations

import sys

from vlkd.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", *sys.argv[1:]]))
