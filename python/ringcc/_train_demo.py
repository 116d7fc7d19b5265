"""The synthetic tasks of `ringcc train` (and bench/train_throughput.py): data from a
fixed seed, identical on every rank, with a target the model can learn."""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import nn
from torch.utils.data import TensorDataset

# mlp: input, hidden width, hidden layers, outputs. transformer: vocabulary (= classes),
# sequence length, width, layers, heads, feed-forward width. "large" is 20-25M parameters.
SHAPES = {
    ("mlp", "small"): dict(d_in=32, hidden=128, layers=3, d_out=8, samples=4096),
    ("mlp", "large"): dict(d_in=512, hidden=2048, layers=6, d_out=16, samples=8192),
    ("transformer", "small"): dict(vocab=16, seq=12, width=64, layers=2, heads=4, ff=128, samples=4096),
    ("transformer", "large"): dict(vocab=64, seq=32, width=512, layers=8, heads=8, ff=2048, samples=4096),
}


class TinyTransformer(nn.Module):
    """Token + learned position embeddings, a pre-norm encoder, a mean-pooled head."""

    def __init__(self, vocab: int, seq: int, width: int, layers: int, heads: int, ff: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.randn(seq, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, ff, dropout=0.1, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens):
        return self.head(self.encoder(self.embed(tokens) + self.pos).mean(dim=1))


def mlp(d_in: int, hidden: int, layers: int, d_out: int, dropout: float = 0.05) -> nn.Sequential:
    mods = [nn.Linear(d_in, hidden), nn.GELU()]
    for _ in range(layers - 1):
        mods += [nn.Linear(hidden, hidden), nn.GELU(), nn.Dropout(dropout)]
    mods.append(nn.Linear(hidden, d_out))
    return nn.Sequential(*mods)


def make_task(model: str, size: str, samples: Optional[int] = None,
              seed: int = 0) -> Tuple[TensorDataset, nn.Module, Callable]:
    """(dataset, model, loss_fn) for `model` in mlp/transformer, `size` in small/large.

    mlp: regression onto a fixed random teacher, y = tanh(x W1) W2 + small noise.
    transformer: classify a token sequence by its first token (position matters)."""
    s = SHAPES[(model, size)]
    n = samples or s["samples"]
    g = torch.Generator().manual_seed(1000 + seed)
    if model == "mlp":
        x = torch.randn(n, s["d_in"], generator=g)
        w1 = torch.randn(s["d_in"], 64, generator=g) / s["d_in"] ** 0.5
        w2 = torch.randn(64, s["d_out"], generator=g) / 8
        y = torch.tanh(x @ w1) @ w2 + 0.01 * torch.randn(n, s["d_out"], generator=g)
        torch.manual_seed(seed)  # the initial model (DDP makes rank 0's the common one anyway)
        net = mlp(s["d_in"], s["hidden"], s["layers"], s["d_out"])
        return TensorDataset(x, y), net, nn.functional.mse_loss
    x = torch.randint(0, s["vocab"], (n, s["seq"]), generator=g)
    torch.manual_seed(seed)
    net = TinyTransformer(s["vocab"], s["seq"], s["width"], s["layers"], s["heads"], s["ff"])
    return TensorDataset(x, x[:, 0].clone()), net, nn.functional.cross_entropy
