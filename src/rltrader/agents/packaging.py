"""One deployable form for every trained network: a module taking the flat observation the envs describe
(``context × F`` window values, then the ``S`` state values) and returning one score per action.

That is what is logged with ``mlflow.pytorch`` (with an input example and a signature), registered, loaded by
the backtest and the trader: none of them needs to know which algorithm produced it. Scores are Q-values
(D3QN), logits (PPO) or class logits mapped to actions (CNN classifier); the policy is always the argmax over
valid actions.

``PolicyModule.split`` cuts our networks where the position state enters (``SplitPolicy``): every net is
``encoder(window) → Linear([embedding; state]) → ReLU → Linear → ReLU → head``, and the window part does not depend
on fills, so a backtest computes it for all decision rows in large batches and runs only the state-dependent rest
(``head_scores``, numba) per decision.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numba import njit
from torch import nn

from rltrader.agents.networks import ActorCritic, Classifier, CNNEncoder, DuelingQNet, Trunk
from rltrader.env.modes import BUY, HOLD, LONG, SELL, SHORT, FuturesAction, SpotAction
from rltrader.errors import DataError
from rltrader.integrity import load_torch, write_sidecar


def module_device(module: nn.Module) -> torch.device:
    """Where a module's tensors live: its first parameter's, or buffer's (the XGBoost policy has buffers only)."""
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


def _first(out: Any) -> torch.Tensor:
    first: torch.Tensor = out[0] if isinstance(out, tuple) else out
    return first


def _traced(net: nn.Module, w: torch.Tensor, s: torch.Tensor) -> Callable[..., Any]:
    """``net`` traced and frozen for the shapes of ``w``/``s`` when that is bit-identical to ``net`` on random
    probes of those shapes (and ``net`` is in eval mode: no dropout to freeze); else ``net`` itself."""
    if net.training:
        return net
    gen = torch.Generator().manual_seed(0)
    probes = [(torch.randn(w.shape, generator=gen), torch.randn(s.shape, generator=gen)) for _ in range(3)]
    try:  # torch.jit is deprecated upstream (2.13 warns) but works; when it is gone, the eager net is used
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            traced = torch.jit.freeze(torch.jit.trace(  # type: ignore[no-untyped-call]
                net, (w.clone(), s.clone()), check_trace=False))
            same = all(torch.equal(_first(traced(pw, ps)), _first(net(pw, ps))) for pw, ps in probes)
    except Exception:  # an untraceable network: the eager one is correct, only slower
        return net
    return traced if same else net


class PolicyModule(nn.Module):
    def __init__(self, net: nn.Module, kind: str, context: int, n_features: int, n_state: int, n_actions: int,
                 meta: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.net, self.kind = net, kind
        self.context, self.n_features, self.n_state, self.n_actions = context, n_features, n_state, n_actions
        self.meta = dict(meta or {})

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """(B, context·F + S) → (B, A) action scores."""
        w = obs[:, : self.context * self.n_features].reshape(-1, self.context, self.n_features)
        s = obs[:, self.context * self.n_features:]
        out = self.net(w, s)
        scores: torch.Tensor = out[0] if isinstance(out, tuple) else out
        return scores

    def scores(self, window: np.ndarray, state: np.ndarray) -> np.ndarray:
        device = module_device(self)
        with torch.no_grad():
            w = torch.from_numpy(np.ascontiguousarray(window, dtype=np.float32)).to(device)
            s = torch.from_numpy(np.ascontiguousarray(state, dtype=np.float32)).to(device)
            out = self.net(w, s)
            scores = out[0] if isinstance(out, tuple) else out
        return np.asarray(scores.float().cpu().numpy())

    def bound_scores(self, window: np.ndarray, state: np.ndarray) -> Callable[[], np.ndarray]:
        """``scores`` for fixed float32 buffers (a live trader's one-row window and state, refilled in place
        each bar): the tensors share the arrays' memory and are made once, the forward runs under
        ``inference_mode`` — no per-call conversion, copy or autograd bookkeeping — through the network traced
        and frozen for these shapes (``torch.jit.trace`` + ``freeze``: the per-op Python dispatch, most of a
        one-row forward's time, is gone). The traced net is used only when it gives bit-identical scores to the
        module's own forward on probe inputs (else, or when tracing fails, the eager net). Falls back to
        ``scores`` off the CPU."""
        if next(self.parameters()).device.type != "cpu" or window.dtype != np.float32 or state.dtype != np.float32 \
                or not (window.flags.c_contiguous and state.flags.c_contiguous):
            return lambda: self.scores(window, state)
        w, s = torch.from_numpy(window), torch.from_numpy(state)
        net = _traced(self.net, w, s)

        def run() -> np.ndarray:
            with torch.inference_mode():
                out = net(w, s)
                scores = out[0] if isinstance(out, tuple) else out
                return np.asarray(scores.float().numpy())

        return run

    def policy(self) -> Any:
        """A greedy ``evaluate``-compatible policy (masked argmax)."""
        module = self

        def act(window: np.ndarray, state: np.ndarray, mask: np.ndarray) -> np.ndarray:
            sc = module.scores(window, state)
            sc = np.where(mask, sc, -np.inf)
            return np.asarray(sc.argmax(axis=1), dtype=np.int64)

        return act

    def example_input(self, n: int = 2) -> np.ndarray:
        return np.zeros((n, self.context * self.n_features + self.n_state), dtype=np.float32)

    def split(self) -> SplitPolicy | None:
        """This module cut at the state (``SplitPolicy``); None for a network that is not exactly one of ours
        (or that is stochastic: dropout in training mode), which callers then run through ``scores``."""
        from rltrader.agents.cnn_classifier import ClassifierActions
        from rltrader.agents.forecast_policy import ForecastActions

        net = self.net
        if net.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in net.modules()):
            return None
        if type(net) is ForecastActions:  # the classifier's rule on the precomputed forecast (in cost units)
            z2, z1 = np.zeros((0, 0), np.float32), np.zeros(0, np.float32)
            return SplitPolicy(self, HEAD_CLASSIFIER, net.forecaster, lambda p: p, z2, z2, z1, z2, z1,
                               net.head_params())
        classifier = net if isinstance(net, ClassifierActions) and type(net) is ClassifierActions else None
        inner: nn.Module = classifier.net if classifier is not None else net
        if type(inner) not in ((Classifier,) if classifier is not None else (DuelingQNet, ActorCritic)):
            return None
        trunk = inner.trunk
        if not isinstance(trunk, Trunk) or type(trunk) is not Trunk:
            return None
        layers = list(trunk.mlp)
        first, second = layers[0], layers[2]
        if ([type(m) for m in layers] != [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU]
                or not isinstance(first, nn.Linear) or not isinstance(second, nn.Linear)):
            return None
        n_emb = first.in_features - self.n_state
        if n_emb != trunk.encoder.out_dim:
            return None
        if classifier is not None:  # it feeds the classifier zero state: all of it is precomputable
            futures = classifier.mode == "futures_session"
            if self.n_actions != (len(FuturesAction) if futures else len(SpotAction)):
                return None
            mlp, cls_head, n_state = trunk.mlp, classifier.net.head, self.n_state

            def p_up(e: torch.Tensor) -> torch.Tensor:  # ClassifierActions: softmax(net(window, 0))[:, 1]
                zeros = torch.zeros(len(e), n_state, device=e.device)
                out: torch.Tensor = torch.softmax(cls_head(mlp(torch.cat([e, zeros], dim=1))), dim=1)[:, 1:2]
                return out

            z2, z1 = np.zeros((0, 0), np.float32), np.zeros(0, np.float32)
            return SplitPolicy(self, HEAD_CLASSIFIER, trunk.encoder, p_up, z2, z2, z1, z2, z1,
                               classifier.head_params())
        if isinstance(inner, DuelingQNet):
            code, out = HEAD_DUELING, [inner.value, inner.advantage]
        elif isinstance(inner, ActorCritic):
            code, out = HEAD_LINEAR, [inner.policy]
        else:
            return None
        w_emb, b1 = first.weight[:, :n_emb], first.bias

        def pre(e: torch.Tensor) -> torch.Tensor:  # W·[e; s] + b = (W_e·e + b) + W_s·s: the first part per row
            return nn.functional.linear(e, w_emb, b1)

        def arr(x: torch.Tensor) -> np.ndarray:
            return np.ascontiguousarray(x.detach().float().cpu().numpy())

        return SplitPolicy(self, code, trunk.encoder, pre, arr(first.weight[:, n_emb:]), arr(second.weight.T),
                           arr(second.bias), arr(torch.cat([m.weight for m in out])),
                           arr(torch.cat([m.bias for m in out])), np.zeros(3))


# --- saving and loading, with a content hash ------------------------------------------------------------------
WEIGHTS_HASH_KEY = "weights_sha256"


def weights_sha256(module: nn.Module) -> str:
    """SHA-256 over the module's parameters and buffers (names, dtypes, shapes, raw bytes), in state-dict order.

    It travels inside the pickled module (``meta``), so it is checked wherever the module is loaded from: our
    ``.pt`` file, an MLflow artifact, a registry alias.
    """
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        x = t.detach().cpu().contiguous()
        h.update(f"{name}|{x.dtype}|{tuple(x.shape)}|".encode())
        h.update(x.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def stamp_weights(module: PolicyModule) -> str:
    """Record the weights' hash in ``module.meta`` (before it is saved or logged)."""
    module.meta[WEIGHTS_HASH_KEY] = digest = weights_sha256(module)
    return digest


def check_weights(module: Any, where: str) -> Any:
    """Refuse a loaded module whose weights no longer hash to what was recorded when it was saved."""
    if not isinstance(module, nn.Module):
        raise DataError(f"{where}: not a trained model (holds a {type(module).__name__}, expected a PolicyModule)")
    meta = getattr(module, "meta", None)
    want = meta.get(WEIGHTS_HASH_KEY) if isinstance(meta, dict) else None
    if want is not None and weights_sha256(module) != want:
        raise DataError(f"{where}: model weights are corrupt (their sha256 differs from the one recorded at "
                        f"training{_run_text(meta)})")
    return module


def _run_text(meta: Any) -> str:
    run = meta.get("mlflow_run_id") if isinstance(meta, dict) else None
    return f", MLflow run {run}" if run else ""


def save_policy(module: PolicyModule, path: Path, origin: dict[str, Any] | None = None) -> str:
    """``torch.save`` the module (stamped with its weights' hash) atomically, and its file hash + ``origin``
    (MLflow run, DVC stage) beside it (``<file>.integrity.json``). Returns the file's SHA-256."""
    import os
    import uuid

    if WEIGHTS_HASH_KEY not in module.meta:
        stamp_weights(module)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        torch.save(module, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return write_sidecar(path, origin)


def load_policy_file(path: Path | str, origin: dict[str, Any] | None = None) -> Any:
    """A model file written by ``save_policy`` (or a plain ``torch.save``d ``PolicyModule``), checked: file hash
    (sidecar), parse, weights hash. Any failure is one ``DataError`` naming the file and where it came from."""
    module = load_torch(Path(path), "model file", origin,
                        hint="re-run the training (`rltrader train <algo>` / `dvc repro train`) or load the model "
                             "from MLflow (models:/…)")
    return check_weights(module, str(path))


def load_mlflow_policy(uri: str) -> Any:
    """``mlflow.pytorch.load_model`` with its failures named by URI, and the weights hash checked."""
    import mlflow.pytorch

    from rltrader.integrity import reading

    with reading(uri, "MLflow model", "its artifact is damaged: re-log it by re-running the training"):
        module = mlflow.pytorch.load_model(uri, map_location="cpu")
    return check_weights(module, uri)


HEAD_LINEAR, HEAD_DUELING, HEAD_CLASSIFIER = range(3)
"""``SplitPolicy.code``: scores = the output layer (PPO's policy logits); Q = V + A - mean(A) from the output
rows ``[V, A…]`` (D3QN); ``ClassifierActions``' rule on the precomputed P(up) and the position side."""


@dataclass(frozen=True, eq=False)
class SplitPolicy:
    """A ``PolicyModule`` cut where the state enters. ``precompute(features, rows)`` → (n, P) float32, the part
    of the network that depends on the windows ``features[r - context: r]`` only: ``tail(encoder(window))`` =
    the first hidden layer's pre-activation without the state term (``W_e·embedding + b``), or the classifier's
    P(up). ``head_scores`` then gives the module's scores from one such row and the state (``state_weight`` =
    ``W_s``; ``hidden_weight_t`` = the second layer's weight, transposed; ``out_*`` = the output layer). Scores
    equal ``module.scores`` up to float32 rounding order."""

    module: PolicyModule
    code: int
    encoder: nn.Module
    tail: Callable[[torch.Tensor], torch.Tensor]
    state_weight: np.ndarray
    hidden_weight_t: np.ndarray
    hidden_bias: np.ndarray
    out_weight: np.ndarray
    out_bias: np.ndarray
    head_params: np.ndarray
    """Classifier: float32 thresholds (up, down) as float64, futures (1/0)."""

    def precompute(self, features: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """The rows' precomputed parts, (n, P) float32: one batched forward pass over their windows."""
        c = self.module.context
        rows = np.asarray(rows, np.int64)
        lo = int(rows.min()) - c
        device = module_device(self.module)
        with torch.inference_mode():
            f = torch.from_numpy(np.ascontiguousarray(features[lo: int(rows.max())], dtype=np.float32)).to(device)
            out = self.tail(encode_windows(self.encoder, f, rows - lo, c))
        return np.ascontiguousarray(out.float().cpu().numpy())

    def scores(self, pre: np.ndarray, state: np.ndarray) -> np.ndarray:
        """``head_scores`` row by row: (n, P) precomputed rows and (n, S) states → (n, A) scores."""
        out = np.zeros((len(pre), self.module.n_actions), np.float32)
        st = np.ascontiguousarray(state, dtype=np.float32)
        h1, h2, o = head_scratch(self.hidden_weight_t, self.out_weight)
        for i in range(len(pre)):
            head_scores(pre[i], st[i], self.code, self.state_weight, self.hidden_weight_t, self.hidden_bias,
                        self.out_weight, self.out_bias, self.head_params, h1, h2, o, out[i])
        return out


def encode_windows(encoder: nn.Module, features: torch.Tensor, rows: np.ndarray, context: int) -> torch.Tensor:
    """``encoder`` on the windows ``features[r - context: r]`` of ``rows``; ``CNNEncoder``: shared over runs of
    consecutive rows (``_cnn_runs``)."""
    if isinstance(encoder, CNNEncoder) and type(encoder) is CNNEncoder and _cnn_shareable(encoder, context):
        return _cnn_runs(encoder, features, rows, context)
    r = torch.as_tensor(rows, device=features.device)
    out: torch.Tensor = encoder(features[r[:, None] + torch.arange(-context, 0, device=features.device)])
    return out


def _cnn_shareable(encoder: CNNEncoder, context: int) -> bool:
    """Whether ``_cnn_runs`` applies: "same"-padded stride-1 convolutions and a window longer than the outputs
    at its two ends that see its zero padding."""
    convs = (encoder.conv1, encoder.conv2)
    if any(c.stride != (1,) or c.dilation != (1,) or c.groups != 1 or c.padding_mode != "zeros"
           or not isinstance(c.padding, tuple) or 2 * c.padding[0] + 1 != c.kernel_size[0] for c in convs):
        return False
    e = sum(int(c.padding[0]) for c in convs)
    return e > 0 and 2 * e <= context


def _cnn_runs(encoder: CNNEncoder, features: torch.Tensor, rows: np.ndarray, context: int) -> torch.Tensor:
    """``CNNEncoder`` (relu(conv1), relu(conv2), then [mean over the window, last position]) on many windows.
    Consecutive decision rows' windows overlap in all but one bar, and a window's outputs more than ``e`` (the
    two paddings) positions from its ends do not see its zero padding: they are the convolutions of the feature
    series itself, computed once per run of consecutive rows; their sum over a window is a difference of prefix
    sums (float64). Only the ``e`` outputs at either end are computed per window (from its first and last
    ``2e`` bars). Equal to ``encoder(windows)`` up to float rounding order."""
    c1, c2 = encoder.conv1, encoder.conv2
    p1, p2 = int(c1.padding[0]), int(c2.padding[0])
    e, T = p1 + p2, context
    F_ = nn.functional

    def convs(x: torch.Tensor, pad1: tuple[int, int], pad2: tuple[int, int]) -> torch.Tensor:
        y = F_.relu(F_.conv1d(F_.pad(x, pad1), c1.weight, c1.bias))
        return F_.relu(F_.conv1d(F_.pad(y, pad2), c2.weight, c2.bias))

    n = len(rows)
    inside = torch.empty(n, c2.out_channels, dtype=torch.float64, device=features.device)
    cut = np.flatnonzero(np.diff(rows) != 1) + 1
    for a, b in zip(np.concatenate([[0], cut]), np.concatenate([cut, [n]]), strict=True):
        # the series of the run's windows, unpadded: output k is window position e of the run's k-th window
        y = convs(features[rows[a] - T: rows[b - 1]].T[None], (0, 0), (0, 0))[0].double()
        cs = F_.pad(y.cumsum(dim=1), (1, 0))
        inside[a:b] = (cs[:, T - 2 * e: T - 2 * e + b - a] - cs[:, : b - a]).T
    r = torch.as_tensor(rows, device=features.device)
    idx = r[:, None] + torch.arange(-T, -T + 2 * e, device=features.device)
    left = convs(features[idx].transpose(1, 2), (p1, 0), (p2, 0))  # window positions [0, e)
    right = convs(features[idx + (T - 2 * e)].transpose(1, 2), (0, p1), (0, p2))  # [T - e, T)
    total = inside + left.sum(dim=2, dtype=torch.float64) + right.sum(dim=2, dtype=torch.float64)
    return torch.cat([(total / T).float(), right[:, :, -1]], dim=1)


@njit(cache=True)
def head_scratch(hidden_weight_t: np.ndarray, out_weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``head_scores``' scratch vectors: h1, h2, the output layer."""
    return (np.zeros(hidden_weight_t.shape[0], np.float32), np.zeros(hidden_weight_t.shape[1], np.float32),
            np.zeros(out_weight.shape[0], np.float32))


@njit(cache=True)
def head_scores(pre: np.ndarray, state: np.ndarray, code: int, state_weight: np.ndarray, hidden_weight_t: np.ndarray,
                hidden_bias: np.ndarray, out_weight: np.ndarray, out_bias: np.ndarray, head_params: np.ndarray,
                h1: np.ndarray, h2: np.ndarray, out: np.ndarray, scores: np.ndarray) -> None:
    """The state-dependent rest of a ``SplitPolicy`` for one decision (float32, like the module): ``pre`` is
    the row's precomputed part, ``state`` its state vector; writes ``scores`` (``h1``, ``h2``, ``out``:
    scratch)."""
    if code == HEAD_CLASSIFIER:  # cnn_classifier.threshold_scores
        p, side = pre[0], state[0]
        up, down = p >= head_params[0], p <= head_params[1]
        scores[:] = -1.0
        scores[HOLD] = 0.0
        if head_params[2] > 0.0:  # futures: long / short
            scores[LONG] = 1.0 if up and side <= 0.0 else -1.0
            scores[SHORT] = 1.0 if down and side >= 0.0 else -1.0
        else:  # spot: buy / sell
            scores[BUY] = 1.0 if up and side == 0.0 else -1.0
            scores[SELL] = 1.0 if down and side > 0.0 else -1.0
        return
    n1, n2 = hidden_weight_t.shape
    for i in range(n1):  # h1 = relu(pre + W_s·s)
        acc = pre[i]
        for k in range(state.shape[0]):
            acc += state_weight[i, k] * state[k]
        h1[i] = acc if acc > 0.0 else np.float32(0.0)
    h2[:] = hidden_bias  # h2 = relu(W2·h1 + b2), as column updates (vectorised over the outputs)
    for i in range(n1):
        x = h1[i]
        if x != 0.0:
            for j in range(n2):
                h2[j] += x * hidden_weight_t[i, j]
    for j in range(n2):
        if h2[j] < 0.0:
            h2[j] = 0.0
    for o in range(out.shape[0]):
        acc = out_bias[o]
        for j in range(n2):
            acc += out_weight[o, j] * h2[j]
        out[o] = acc
    if code == HEAD_DUELING:  # Q = V + A - mean(A)
        n_a = out.shape[0] - 1
        mean = np.float32(0.0)
        for a in range(n_a):
            mean += out[1 + a]
        mean /= np.float32(n_a)
        for a in range(n_a):
            scores[a] = (out[0] + out[1 + a]) - mean
    else:
        for a in range(out.shape[0]):
            scores[a] = out[a]
