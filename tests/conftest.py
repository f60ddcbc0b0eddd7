"""Shared test settings: CPU, one thread (tests use tiny models, and a second thread's synchronisation costs
seconds per step when the cores are busy), offline."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)
