"""Shared test setup: offline Hugging Face, few threads (CPU runners are shared)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402  (after the environment is set)

torch.set_num_threads(2)
