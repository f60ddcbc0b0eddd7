"""`python -m vlkd` (what `accelerate launch -m vlkd` runs)."""

from vlkd.cli import main

raise SystemExit(main())
