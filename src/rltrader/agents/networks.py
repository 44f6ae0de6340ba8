"""Networks shared by the agents: a window encoder (a small CNN or a TCN) plus heads.

Every network takes the observation as the envs produce it: ``windows`` (B, context, F) float32 — the last
``context`` closed bars of features — and ``state`` (B, S) — position and account features. The encoder turns
the window into a vector, the state is appended, an MLP trunk mixes them, and a head reads the result.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from rltrader.agents.configs import NetConfig

__all__ = ["NetConfig"]  # re-exported: the networks' configuration lives with the agent configs


class CNNEncoder(nn.Module):
    """The D3QN reference design's encoder: two 1D convolutions over time with the features as channels, then
    global pooling."""

    def __init__(self, n_features: int, cfg: NetConfig) -> None:
        super().__init__()
        c = cfg.channels
        self.conv1 = nn.Conv1d(n_features, c, kernel_size=5, padding=2)
        self.conv2 = nn.Conv1d(c, c, kernel_size=3, padding=1)
        self.out_dim = 2 * c

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        return self._pool(self._convs(windows.transpose(1, 2)))  # (B, F, T) in

    def _convs(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(F.relu(self.conv1(x))))

    @staticmethod
    def _pool(y: torch.Tensor) -> torch.Tensor:
        return torch.cat([y.mean(dim=2), y[:, :, -1]], dim=1)  # average over the window + the latest bar

    def edge(self, context: int) -> int:
        """How many outputs at either end of a window see its zero padding (``e``: the two paddings), or 0 when
        ``pair`` does not apply (not "same"-padded stride-1 convolutions, or a window shorter than ``2e``)."""
        convs = (self.conv1, self.conv2)
        if any(c.stride != (1,) or c.dilation != (1,) or c.groups != 1 or c.padding_mode != "zeros"
               or not isinstance(c.padding, tuple) or 2 * c.padding[0] + 1 != c.kernel_size[0] for c in convs):
            return 0
        e = sum(int(c.padding[0]) for c in convs)  # type: ignore[arg-type]
        return e if 2 * e <= context else 0

    def pair(self, ext: torch.Tensor, shift: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(forward(ext[:, :T]), forward(ext[:, shift:]))`` with ``T = ext.shape[1] - shift``, the second
        without gradient (it serves targets), for two windows that overlap in ``T - shift`` bars (a transition's
        observation and its n-step successor's).

        The first window runs as ``forward``. Outputs more than ``e`` positions (``edge``) from both windows' ends
        do not see either window's zero padding, so the second window takes them from the first's pass; only its
        ``e`` first outputs (from its first ``2e`` bars) and the outputs past the first window's interior (from
        the last ``2e + shift`` bars) are computed: about half of a second pass (``shift`` 3, ``e`` 3, ``T``
        30: 15 bars instead of 30). Mathematically equal to two forward passes (float rounding order aside)."""
        T = ext.shape[1] - shift
        e = self.edge(T)
        if e == 0 or shift < 1:
            raise ValueError(f"CNNEncoder.pair: needs 'same' convolutions, a window ≥ 2·edge and shift ≥ 1 "
                             f"(window {T}, edge {e}, shift {shift})")
        x = ext.transpose(1, 2)  # (B, F, T + shift)
        y = self._convs(x[:, :, :T])
        with torch.no_grad():
            if shift > T - 2 * e:  # nothing in common but padding-affected outputs: a plain second pass
                second = self._convs(x[:, :, shift:])
            else:
                second = torch.cat([self._convs(x[:, :, shift:shift + 2 * e])[:, :, :e],
                                    y[:, :, shift + e:T - e],
                                    self._convs(x[:, :, T - 2 * e:])[:, :, e:]], dim=2)
        return self._pool(y), self._pool(second)


class _CausalBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel: int, dilation: int, dropout: float) -> None:
        super().__init__()
        self.pad = (kernel - 1) * dilation
        self.conv1 = nn.Conv1d(c_in, c_out, kernel, dilation=dilation)
        self.conv2 = nn.Conv1d(c_out, c_out, kernel, dilation=dilation)
        self.drop = nn.Dropout(dropout)
        self.skip = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # left padding only: output t depends on inputs ≤ t (causal inside the window too)
        y = self.drop(F.relu(self.conv1(F.pad(x, (self.pad, 0)))))
        y = self.drop(F.relu(self.conv2(F.pad(y, (self.pad, 0)))))
        return F.relu(y + self.skip(x))


class TCNEncoder(nn.Module):
    """Temporal convolutional network: residual blocks with dilations 1, 2, 4, …; reads the last time step,
    whose receptive field covers ``1 + 2·(kernel-1)·(2^levels - 1)`` bars."""

    def __init__(self, n_features: int, cfg: NetConfig) -> None:
        super().__init__()
        blocks = []
        c_in = n_features
        for level in range(cfg.tcn_levels):
            blocks.append(_CausalBlock(c_in, cfg.channels, cfg.kernel, 2**level, cfg.dropout))
            c_in = cfg.channels
        self.blocks = nn.Sequential(*blocks)
        self.out_dim = 2 * cfg.channels

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        y = self.blocks(windows.transpose(1, 2))
        return torch.cat([y[:, :, -1], y.mean(dim=2)], dim=1)


def make_encoder(n_features: int, cfg: NetConfig) -> CNNEncoder | TCNEncoder:
    """The window encoder ``cfg.encoder`` names; both pool over the window, so any context length fits."""
    if cfg.encoder == "cnn":
        return CNNEncoder(n_features, cfg)
    if cfg.encoder == "tcn":
        return TCNEncoder(n_features, cfg)
    from rltrader.errors import ConfigError

    raise ConfigError(f"agent.net.encoder: unknown encoder {cfg.encoder!r} (cnn or tcn)")


class Trunk(nn.Module):
    """Encoder + state → hidden vector."""

    def __init__(self, n_features: int, n_state: int, cfg: NetConfig) -> None:
        super().__init__()
        self.encoder = make_encoder(n_features, cfg)
        self.mlp = nn.Sequential(nn.Linear(self.encoder.out_dim + n_state, cfg.hidden), nn.ReLU(),
                                 nn.Linear(cfg.hidden, cfg.hidden), nn.ReLU())
        self.out_dim = cfg.hidden

    def forward(self, windows: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.mlp(torch.cat([self.encoder(windows), state], dim=1))
        return out


class DuelingQNet(nn.Module):
    """Q(s, a) = V(s) + A(s, a) - mean_a A(s, a) (the dueling head of the D3QN reference design)."""

    def __init__(self, n_features: int, context: int, n_state: int, n_actions: int, cfg: NetConfig) -> None:
        super().__init__()
        self.trunk = Trunk(n_features, n_state, cfg)
        self.value = nn.Linear(self.trunk.out_dim, 1)
        self.advantage = nn.Linear(self.trunk.out_dim, n_actions)

    def forward(self, windows: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        return self._q(self.trunk(windows, state))

    def _q(self, h: torch.Tensor) -> torch.Tensor:
        adv = self.advantage(h)
        q: torch.Tensor = self.value(h) + adv - adv.mean(dim=1, keepdim=True)
        return q

    def can_pair(self, context: int) -> bool:
        """Whether ``pair`` applies (a CNN encoder with "same" convolutions and a long enough window)."""
        enc = self.trunk.encoder
        return type(enc) is CNNEncoder and enc.edge(context) > 0

    def pair(self, ext: torch.Tensor, state: torch.Tensor, next_state: torch.Tensor, shift: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(self(ext[:, :T], state), self(ext[:, shift:], next_state))``, the second without gradient, with one
        convolution pass over the shared bars (``CNNEncoder.pair``): the online net's Q of a transition's
        observation and of its n-step successor in double DQN."""
        enc = self.trunk.encoder
        assert isinstance(enc, CNNEncoder)
        h_obs, h_next = enc.pair(ext, shift)
        q = self._q(self.trunk.mlp(torch.cat([h_obs, state], dim=1)))
        with torch.no_grad():
            q_next = self._q(self.trunk.mlp(torch.cat([h_next, next_state], dim=1)))
        return q, q_next


class ActorCritic(nn.Module):
    """Shared trunk, a policy head (logits) and a value head: PPO's network."""

    def __init__(self, n_features: int, context: int, n_state: int, n_actions: int, cfg: NetConfig) -> None:
        super().__init__()
        self.trunk = Trunk(n_features, n_state, cfg)
        self.policy = nn.Linear(self.trunk.out_dim, n_actions)
        self.value = nn.Linear(self.trunk.out_dim, 1)
        nn.init.orthogonal_(self.policy.weight, 0.01)
        nn.init.zeros_(self.policy.bias)

    def forward(self, windows: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(windows, state)
        return self.policy(h), self.value(h).squeeze(1)


class Classifier(nn.Module):
    """Seed 002's supervised baseline: the same trunk predicting the direction of the next bars."""

    def __init__(self, n_features: int, context: int, n_state: int, n_classes: int, cfg: NetConfig) -> None:
        super().__init__()
        self.trunk = Trunk(n_features, n_state, cfg)
        self.head = nn.Linear(self.trunk.out_dim, n_classes)

    def forward(self, windows: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.trunk(windows, state))
        return out


def masked_logits(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Invalid actions get the dtype's lowest value: zero probability, and never the argmax."""
    return logits.masked_fill(~mask, torch.finfo(logits.dtype).min)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
