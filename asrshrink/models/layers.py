"""Building blocks shared by model families: single LSTM layers, LSTM stacks, time stacking.

Dimension letters: T time, B batch, I input features, H hidden size.
"""

from __future__ import annotations

import torch
from torch import nn

LSTMState = tuple[torch.Tensor, torch.Tensor]  # (h, c), each (1, B, H)


class LSTMLayer(nn.Module):
    """One unidirectional LSTM layer with two bias vectors (PyTorch gate order: input, forget, cell, output).

    Each layer is its own module so that a compression method can reach its input, output and weights.
    """

    def __init__(self, input_size: int, hidden_size: int, *, forget_gate_bias: float | None = 1.0):
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.lstm = nn.LSTM(input_size, hidden_size, num_layers=1)
        if forget_gate_bias is not None:
            with torch.no_grad():
                self.lstm.bias_ih_l0[hidden_size:2 * hidden_size].fill_(forget_gate_bias)
                self.lstm.bias_hh_l0[hidden_size:2 * hidden_size].fill_(0.0)

    @property
    def weight_ih(self) -> torch.Tensor:  # (4H, I)
        return self.lstm.weight_ih_l0

    @property
    def weight_hh(self) -> torch.Tensor:  # (4H, H)
        return self.lstm.weight_hh_l0

    def forward(self, x: torch.Tensor, state: LSTMState | None = None) -> tuple[torch.Tensor, LSTMState]:
        """x (T, B, I), state (h, c) each (1, B, H) or None for zeros -> y (T, B, H), new state."""
        return self.lstm(x, state)

    def flops_per_step(self) -> int:
        """Multiply-adds of one time step counted as 2 FLOPs (gate matmuls only)."""
        return 2 * 4 * self.hidden_size * (self.input_size + self.hidden_size)


class LSTMStack(nn.Module):
    """LSTM layers run in sequence, with dropout after every layer in training (identity in eval)."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int, *, dropout: float = 0.0,
                 forget_gate_bias: float | None = 1.0):
        super().__init__()
        sizes = [input_size] + [hidden_size] * num_layers
        self.layers = nn.ModuleList(
            LSTMLayer(sizes[i], hidden_size, forget_gate_bias=forget_gate_bias) for i in range(num_layers))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x (T, B, I), state (h, c) each (L, B, H) or None -> y (T, B, H), state (h, c) each (L, B, H)."""
        hs, cs = [], []
        for i, layer in enumerate(self.layers):
            layer_state = None if state is None else (state[0][i:i + 1], state[1][i:i + 1])
            x, (h, c) = layer(x, layer_state)
            x = self.dropout(x)
            hs.append(h)
            cs.append(c)
        return x, (torch.cat(hs, 0), torch.cat(cs, 0))


def stack_time(x: torch.Tensor, lengths: torch.Tensor, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate each run of ``factor`` consecutive frames, zero-padding the end.

    x (T, B, D), lengths (B,) -> (ceil(T / factor), B, factor * D), ceil(lengths / factor).
    """
    t, b, d = x.shape
    pad = (-t) % factor
    if pad:
        x = torch.cat([x, x.new_zeros(pad, b, d)], dim=0)
    x = x.transpose(0, 1).reshape(b, (t + pad) // factor, factor * d).transpose(0, 1)
    return x, torch.div(lengths + factor - 1, factor, rounding_mode="floor")
