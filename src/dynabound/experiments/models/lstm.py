"""Word-level LSTM language model for the paper's Penn Treebank experiment."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Hidden", "LSTMLanguageModel", "detach_hidden"]

Hidden = tuple[torch.Tensor, torch.Tensor]  # (h, c), each [num_layers, B, hidden_dim]


def detach_hidden(hidden: Hidden) -> Hidden:
    """Cut the graph between truncated-BPTT windows while keeping the state's values."""
    return tuple(h.detach() for h in hidden)  # type: ignore[return-value]


class LSTMLanguageModel(nn.Module):
    """Embedding -> dropout -> ``num_layers``-layer LSTM -> dropout -> linear decoder.

    The paper compares optimizers on 1-, 2- and 3-layer LSTMs on Penn Treebank but states
    no sizes and its code was never released. The defaults here (embed = hidden = 200, no
    dropout) are the sizes of Zaremba et al.'s (2014) "small" model, quick on a CPU; for
    paper-scale runs their "medium" sizes (embed = hidden = 650, dropout 0.5) are the
    documented standard. ``tie_weights`` shares the embedding and decoder matrices
    (Press & Wolf, 2017) and needs ``embed_dim == hidden_dim``.
    """

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int = 200,
        hidden_dim: int = 200,
        num_layers: int = 1,
        dropout: float = 0.0,
        tie_weights: bool = False,
    ):
        super().__init__()
        for name, value in (
            ("vocab_size", vocab_size),
            ("embed_dim", embed_dim),
            ("hidden_dim", hidden_dim),
            ("num_layers", num_layers),
        ):
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if tie_weights and embed_dim != hidden_dim:
            raise ValueError(
                f"tie_weights needs embed_dim == hidden_dim, got {embed_dim} and {hidden_dim}"
            )
        self.vocab_size, self.hidden_dim, self.num_layers = vocab_size, hidden_dim, num_layers
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.drop = nn.Dropout(dropout)
        # nn.LSTM applies its dropout only between layers, so a single layer gets none there.
        self.lstm = nn.LSTM(
            embed_dim, hidden_dim, num_layers, dropout=dropout if num_layers > 1 else 0.0
        )
        self.decoder = nn.Linear(hidden_dim, vocab_size)
        # Small uniform embeddings and decoder, zero decoder bias: the usual PTB start, which
        # makes the initial perplexity close to the vocabulary size.
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        if tie_weights:
            self.decoder.weight = self.embedding.weight

    def init_hidden(self, batch_size: int) -> Hidden:
        """Zero (h, c) on the model's device and dtype."""
        w = self.decoder.weight
        shape = (self.num_layers, batch_size, self.hidden_dim)
        return w.new_zeros(shape), w.new_zeros(shape)

    def forward(
        self, tokens: torch.Tensor, hidden: Hidden | None = None
    ) -> tuple[torch.Tensor, Hidden]:
        """``tokens`` [T, B] of ids -> (logits [T, B, vocab_size], new hidden state)."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [T, B], got shape {list(tokens.shape)}")
        if hidden is None:
            hidden = self.init_hidden(tokens.shape[1])
        out, hidden = self.lstm(self.drop(self.embedding(tokens)), hidden)
        return self.decoder(self.drop(out)), hidden
