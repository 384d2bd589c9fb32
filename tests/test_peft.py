"""PEFT LoRA adapters under randomize(): the frozen layers store nothing, the adapters' inputs are
stored as sketches (k = round(ρ·n) rows each), and
gradients reach only the adapters (docs/how-to/peft.md)."""

from __future__ import annotations

import pytest
import torch

import varstudy
from varstudy.randomized.memory import saved_bytes
from varstudy.randomized.sketches import rows_for

peft = pytest.importorskip("peft")

RATIO, BATCH, LENGTH, RANK = 0.25, 2, 16, 4


def _lora_model(seed: int = 0):
    torch.manual_seed(seed)
    model, tokenizer = varstudy.load_model("tiny-bert")
    config = peft.LoraConfig(r=RANK, lora_alpha=8, lora_dropout=0.0,
                             target_modules=["query", "value"])
    model = peft.get_peft_model(model, config)
    batch = tokenizer(["a tiny example", "another one"], padding="max_length",
                      max_length=LENGTH, return_tensors="pt")
    return model, dict(batch, labels=torch.tensor([0, 1]))


def _saved(model, batch):
    loss, report = saved_bytes(lambda: model(**batch).loss, model=model)
    return report


def test_frozen_layers_store_nothing_and_adapters_are_sketched():
    exact_model, batch = _lora_model()
    exact = _saved(exact_model, batch)
    model, batch = _lora_model()
    conversion = varstudy.randomize(model, ratio=RATIO, sketch="rows", seed=0)
    assert any("lora_A" in name for name in conversion.names)
    report = _saved(model, batch)
    n, hidden = BATCH * LENGTH, model.base_model.model.config.hidden_size
    for rep in (exact, report):  # frozen weights need no input for their (absent) gradient
        assert not any(b for name, b in rep.by_module.items() if name.endswith("base_layer"))
    layers = model.base_model.model.config.num_hidden_layers
    for i in range(layers):
        prefix = f"base_model.model.bert.encoder.layer.{i}.attention.self."
        a_exact = sum(exact.by_module.get(f"{prefix}{p}.lora_A.default", 0)
                      for p in ("query", "value"))
        a_sketch = sum(report.by_module.get(f"{prefix}{p}.lora_A.default", 0)
                       for p in ("query", "value"))
        assert a_exact == n * hidden * 4  # both adapters read one X: stored once, whole
        # each adapter stores its own sketch of k rows: the layers' sketch cache holds one entry
        # and lora_B's input replaces X in it before the value adapter runs (docs/how-to/peft.md)
        assert a_sketch == 2 * rows_for(n, RATIO) * hidden * 4
        b_sketch = sum(report.by_module.get(f"{prefix}{p}.lora_B.default", 0)
                       for p in ("query", "value"))
        assert b_sketch == 2 * rows_for(n, RATIO) * RANK * 4  # each lora_B its own r-wide input


def test_gradients_reach_only_the_adapters():
    model, batch = _lora_model()
    varstudy.randomize(model, ratio=RATIO, sketch="rows", seed=0)
    model(**batch).loss.backward()
    for name, param in model.named_parameters():
        if "lora_" in name:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
        else:
            assert param.grad is None, name
