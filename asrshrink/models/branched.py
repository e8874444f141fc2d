"""Branch-switched layers of an amortized network (AmNet, Macoskey et al. 2021, Fig. 1 and eqs. 1-2): LSTM
layers with N = 2 branches over one recurrent state (h, c), and the small recurrent arbitrator that picks a
branch per frame.

Branch 0 is the slow (expensive) branch, branch 1 the fast one. Both share their weights:

- ``kind="mf"``: each side (input "ih", recurrent "hh") is one pair of SVD factors up (4H, r_slow), down
  (r_slow, I); the fast branch uses their first r_fast columns / rows (paper eq. 4), so memory does not grow;
- ``kind="sparse"``: each side is one dense weight with two magnitude masks (buffers, 1 kept), the fast mask
  inside the slow one (s_slow < s_fast).

Training combines the branches' new states with the decisions d_t (eq. 2, layer by layer); run-time hard
switching computes only the chosen branch of each utterance at each frame. With one-hot decisions the two agree.

Dimension letters: T time, B batch, I input size, H hidden size, N branches, F arbitrator input size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

SIDES = ("ih", "hh")
KINDS = ("mf", "sparse")
#: How a forward picks branches: "gumbel" (soft Gumbel-softmax samples, eq. 1), "random" (one-hot, 50/50),
#: "argmax" (one-hot argmax, computed through the combiner) or "hard" (argmax, only the chosen branch runs).
SAMPLING = ("gumbel", "random", "argmax", "hard")


@dataclass
class BranchTrace:
    """What an AmNet encoder decided: ``decisions`` d_t (B, T', N) as applied (soft or one-hot), ``log_pi``
    (B, T', N) the arbitrator's log-probabilities, ``lengths`` (B,) the decision frames of each utterance."""

    decisions: torch.Tensor
    log_pi: torch.Tensor
    lengths: torch.Tensor


class BranchedLSTMLayer(nn.Module):
    """An LSTM layer (PyTorch gate order i, f, g, o) with N weight-sharing branches of decreasing cost.

    ``ranks[side]`` = (r_0, ..., r_{N-1}) for "mf" (non-increasing); for "sparse" the masks (N, 4H, in) are
    buffers ``mask_ih`` / ``mask_hh``."""

    #: Its forward takes the decisions (as the encoder's AmNet path checks; so does its ONNX export form).
    takes_decisions = True

    def __init__(self, input_size: int, hidden_size: int, kind: str, *, ranks: dict[str, tuple[int, ...]] | None = None,
                 branches: int = 2):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown branch kind {kind!r}")
        self.input_size, self.hidden_size, self.kind, self.branches = input_size, hidden_size, kind, branches
        sizes = {"ih": input_size, "hh": hidden_size}
        out = 4 * hidden_size
        self.bias_ih = nn.Parameter(torch.zeros(out))
        self.bias_hh = nn.Parameter(torch.zeros(out))
        if kind == "mf":
            if ranks is None or any(len(ranks[s]) != branches for s in SIDES):
                raise ValueError("mf branches need ranks per side and branch")
            self.ranks = {s: tuple(int(r) for r in ranks[s]) for s in SIDES}
            for s in SIDES:
                setattr(self, f"{s}_down", nn.Parameter(torch.zeros(self.ranks[s][0], sizes[s])))
                setattr(self, f"{s}_up", nn.Parameter(torch.zeros(out, self.ranks[s][0])))
        else:
            self.ranks = {}
            for s in SIDES:
                setattr(self, f"weight_{s}", nn.Parameter(torch.zeros(out, sizes[s])))
                self.register_buffer(f"mask_{s}", torch.ones(branches, out, sizes[s]))

    # --- the branches' matrices --------------------------------------------------------------------------------
    def project(self, side: str, x: torch.Tensor, branch: int) -> torch.Tensor:
        """Branch ``branch``'s map of one side without bias: x (..., in) -> (..., 4H)."""
        if self.kind == "mf":
            r = self.ranks[side][branch]
            down, up = getattr(self, f"{side}_down")[:r], getattr(self, f"{side}_up")[:, :r]
            return F.linear(F.linear(x, down), up)
        return F.linear(x, self.weight(side, branch))

    def weight(self, side: str, branch: int) -> torch.Tensor:
        """The effective (4H, in) matrix of a branch's side."""
        if self.kind == "mf":
            r = self.ranks[side][branch]
            return getattr(self, f"{side}_up")[:, :r] @ getattr(self, f"{side}_down")[:r]
        return getattr(self, f"weight_{side}") * getattr(self, f"mask_{side}")[branch]

    def nonzeros(self, side: str, branch: int) -> int:
        """Kept weights of a sparse branch's side (its mask's ones)."""
        return int(getattr(self, f"mask_{side}")[branch].count_nonzero())

    def flops_per_step(self, branch: int = 0) -> int:
        """FLOPs (2 per multiply-add) of the gate matmuls of one time step on ``branch``: the factor products for
        "mf" (2 r (in + 4H) per side), the kept weights for "sparse" (2 per non-zero: what a sparse kernel does)."""
        out = 4 * self.hidden_size
        total = 0
        for side, size in (("ih", self.input_size), ("hh", self.hidden_size)):
            if self.kind == "mf":
                total += 2 * self.ranks[side][branch] * (size + out)
            else:
                total += 2 * self.nonzeros(side, branch)
        return total

    def recurrent_chain(self, branch: int) -> list[torch.Tensor]:
        """The recurrent side of ``branch`` as matrices to multiply h (B, H) by in turn: [down^T (H, r), up^T
        (r, 4H)] for "mf", [W^T (H, 4H)] for "sparse"."""
        if self.kind == "mf":
            r = self.ranks["hh"][branch]
            return [self.hh_down[:r].t().contiguous(), self.hh_up[:, :r].t().contiguous()]
        return [self.weight("hh", branch).t().contiguous()]

    # --- computation ---------------------------------------------------------------------------------------
    def _cell(self, pre: torch.Tensor, h: torch.Tensor, c: torch.Tensor, branch: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
        i, f, g, o = (pre + self.project("hh", h, branch) + self.bias_hh).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c

    @property
    def output_size(self) -> int:
        """Features of the layer's output and state (H): branches share one recurrent state."""
        return self.hidden_size

    def forward(self, x: torch.Tensor, decisions: torch.Tensor, state=None, *, hard: bool = False):
        """x (T, B, I), decisions (T, B, N) (rows sum to 1), state (h, c) each (1, B, H) or None -> y (T, B, H),
        state. Soft: every branch runs and the new (h, c) is sum_n d_t(n) (h_{t,n}, c_{t,n}) (eq. 2); ``hard``:
        only the argmax branch of each utterance runs at each step."""
        steps, batch = x.shape[:2]
        h = x.new_zeros(batch, self.hidden_size) if state is None else state[0][0]
        c = x.new_zeros(batch, self.hidden_size) if state is None else state[1][0]
        outputs = []
        if hard:
            chosen = decisions.argmax(-1)                                           # (T, B)
            pre = x.new_empty(steps, batch, 4 * self.hidden_size)
            for n in range(self.branches):                                          # input side, chosen frames only
                where = chosen == n
                if bool(where.any()):
                    pre[where] = self.project("ih", x[where], n) + self.bias_ih
            if batch == 1 and steps and not torch.is_grad_enabled():
                # one utterance (as a device streams it): the steps run in TorchScript over each branch's
                # matrices, transposed once, so no Python runs per frame
                chains = [self.recurrent_chain(n) for n in range(self.branches)]
                y, h, c = _scripted(_steps)(pre, chosen[:, 0].tolist(), h, c, chains, self.bias_hh)
                return y, (h.unsqueeze(0), c.unsqueeze(0))
            for t in range(steps):
                if batch == 1:
                    h, c = self._cell(pre[t], h, c, int(chosen[t, 0]))
                else:
                    h_new, c_new = torch.empty_like(h), torch.empty_like(c)
                    for n in range(self.branches):
                        rows = (chosen[t] == n).nonzero().flatten()
                        if rows.numel():
                            h_new[rows], c_new[rows] = self._cell(pre[t, rows], h[rows], c[rows], n)
                    h, c = h_new, c_new
                outputs.append(h)
        else:
            # Each branch's input side for all frames at once, split into per-frame views once: indexing a
            # frame inside the loop would make autograd allocate a full-size gradient per frame (quadratic in T).
            pre = [(self.project("ih", x, n) + self.bias_ih).unbind(0) for n in range(self.branches)]  # N x T x (B,4H)
            for t, d in enumerate(decisions.unsqueeze(-1).unbind(0)):               # d (B, N, 1)
                states = [self._cell(pre[n][t], h, c, n) for n in range(self.branches)]
                h = sum(d[:, n] * s[0] for n, s in enumerate(states))
                c = sum(d[:, n] * s[1] for n, s in enumerate(states))
                outputs.append(h)
        y = torch.stack(outputs) if outputs else x.new_zeros(0, batch, self.hidden_size)
        return y, (h.unsqueeze(0), c.unsqueeze(0))

    def check_loaded(self, name: str, source: str) -> None:
        """Refuse masks that are not 0/1 or not nested (each cheaper branch inside the one before)."""
        from asrshrink.errors import CheckpointError
        from asrshrink.models.validate import REWRITE

        if self.kind != "sparse":
            return
        for side in SIDES:
            mask = getattr(self, f"mask_{side}")
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise CheckpointError(f"{source}: {name}.mask_{side} holds values other than 0 and 1; {REWRITE}")
            if bool((mask[1:] > mask[:-1]).any()):
                raise CheckpointError(f"{source}: {name}.mask_{side}: a fast branch keeps weights its slow branch "
                                      f"prunes (the masks must be nested); {REWRITE}")


def _steps(pre: torch.Tensor, chosen: list[int], h: torch.Tensor, c: torch.Tensor,
           chains: list[list[torch.Tensor]], bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hard-switched LSTM steps: pre (T, B, 4H) the input side, chosen[t] frame t's branch, h, c (B, H), chains[n]
    branch n's recurrent matrices -> y (T, B, H), h, c. The same operations, in the same order, as
    ``BranchedLSTMLayer._cell``."""
    outputs: list[torch.Tensor] = []
    for t in range(pre.shape[0]):
        rec = h
        for w in chains[chosen[t]]:
            rec = torch.mm(rec, w)
        i, f, g, o = (pre[t] + rec + bias).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outputs.append(h)
    return torch.stack(outputs), h, c


def _arbitrator_steps(first: torch.Tensor, w_ih: list[torch.Tensor], w_hh: list[torch.Tensor],
                      bias: list[torch.Tensor], w_proj: torch.Tensor, b_proj: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The arbitrator's argmax steps with feedback: first (T, B, 4A) the first layer's input side of x_t with
    both its biases, w_ih[0] (N, 4A) that layer's matrix for d_{t-1}, w_ih[k] / w_hh[k] the other matrices
    transposed, bias[k] the summed biases (bias[0] already in ``first``), w_proj (A, N) -> one-hot decisions and
    log pi, each (T, B, N)."""
    batch, hidden, branches = first.shape[1], w_hh[0].shape[0], w_proj.shape[1]
    hs = [first.new_zeros(batch, hidden) for _ in w_hh]
    cs = [first.new_zeros(batch, hidden) for _ in w_hh]
    d = first.new_zeros(batch, branches)
    decisions: list[torch.Tensor] = []
    log_pis: list[torch.Tensor] = []
    for t in range(first.shape[0]):
        z = first[t] + torch.mm(d, w_ih[0])
        for k in range(len(w_hh)):
            if k > 0:
                z = torch.mm(z, w_ih[k]) + bias[k]
            i, f, g, o = (z + torch.mm(hs[k], w_hh[k])).chunk(4, dim=-1)
            cs[k] = torch.sigmoid(f) * cs[k] + torch.sigmoid(i) * torch.tanh(g)
            hs[k] = torch.sigmoid(o) * torch.tanh(cs[k])
            z = hs[k]
        log_pi = torch.log_softmax(torch.mm(z, w_proj) + b_proj, -1)
        d = torch.nn.functional.one_hot(log_pi.argmax(-1), branches).to(first.dtype)
        decisions.append(d)
        log_pis.append(log_pi)
    return torch.stack(decisions), torch.stack(log_pis)


_SCRIPTED: dict = {}


def _scripted(function):
    """``function`` compiled by TorchScript (once, on first use)."""
    if function not in _SCRIPTED:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript still runs; nothing here needs more
            _SCRIPTED[function] = torch.jit.script(function)
    return _SCRIPTED[function]


class Arbitrator(nn.Module):
    """The AmNet arbitrator: an LSTM over the decision-rate input x_t, optionally with the previous decision
    d_{t-1} appended (``feedback``), and a projection to N branch logits; log pi_t = log_softmax(logits)."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int, *, branches: int = 2,
                 feedback: bool = True):
        super().__init__()
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.branches, self.feedback = branches, feedback
        self.rnn = nn.LSTM(input_size + (branches if feedback else 0), hidden_size, num_layers)
        self.proj = nn.Linear(hidden_size, branches)

    def flops_per_step(self) -> int:
        """FLOPs of one decision: the LSTM gate matmuls and the projection (2 per multiply-add)."""
        width = self.input_size + (self.branches if self.feedback else 0)
        sizes = [width] + [self.hidden_size] * self.num_layers
        return sum(2 * 4 * self.hidden_size * (sizes[i] + self.hidden_size) for i in range(self.num_layers)) \
            + 2 * self.hidden_size * self.branches

    def forward(self, x: torch.Tensor, *, sampling: str = "hard", temperature: float = 1.0
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (T, B, F) -> decisions d (T, B, N) and log pi (T, B, N). "gumbel" draws soft samples (eq. 1) from
        the global generator; "random" one-hot 50/50 samples; "argmax" / "hard" the one-hot argmax (without
        autograd, with feedback: both by ``_argmax_steps``, so they decide alike)."""
        if sampling not in SAMPLING:
            raise ValueError(f"sampling={sampling!r} is not one of {SAMPLING}")
        if not self.feedback:
            y, _ = self.rnn(x)
            log_pi = F.log_softmax(self.proj(y), -1)
            return self._sample(log_pi, sampling, temperature), log_pi
        steps, batch = x.shape[:2]
        if sampling in ("argmax", "hard") and steps and not torch.is_grad_enabled():
            return self._argmax_steps(x)
        d = x.new_zeros(batch, self.branches)
        state = None
        decisions, log_pis = [], []
        for x_t in x.unbind(0):  # per-frame views made once (see BranchedLSTMLayer.forward)
            y, state = self.rnn(torch.cat([x_t, d], -1).unsqueeze(0), state)
            log_pi = F.log_softmax(self.proj(y[0]), -1)                            # (B, N)
            d = self._sample(log_pi, sampling, temperature)
            decisions.append(d)
            log_pis.append(log_pi)
        if not decisions:
            empty = x.new_zeros(0, batch, self.branches)
            return empty, empty
        return torch.stack(decisions), torch.stack(log_pis)

    def _argmax_steps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Argmax decisions with feedback, without autograd: the first layer's input side for all frames at once,
        then the steps in TorchScript (no Python per frame). x (T, B, F) -> decisions, log pi (T, B, N)."""
        rnn, width = self.rnn, self.input_size
        w_ih0 = rnn.weight_ih_l0
        first = F.linear(x, w_ih0[:, :width], rnn.bias_ih_l0 + rnn.bias_hh_l0)        # (T, B, 4A)
        w_ih = [getattr(rnn, f"weight_ih_l{k}").t().contiguous() for k in range(self.num_layers)]
        w_hh = [getattr(rnn, f"weight_hh_l{k}").t().contiguous() for k in range(self.num_layers)]
        bias = [getattr(rnn, f"bias_ih_l{k}") + getattr(rnn, f"bias_hh_l{k}") for k in range(self.num_layers)]
        w_ih[0] = w_ih0[:, width:].t().contiguous()                                    # (N, 4A): d_{t-1}'s
        return _scripted(_arbitrator_steps)(first, w_ih, w_hh, bias, self.proj.weight.t().contiguous(),
                                            self.proj.bias)

    def _sample(self, log_pi: torch.Tensor, sampling: str, temperature: float) -> torch.Tensor:
        if sampling == "gumbel":
            u = torch.rand_like(log_pi).clamp(1e-10, 1 - 1e-7)
            return F.softmax((log_pi - torch.log(-torch.log(u))) / temperature, -1)
        if sampling == "random":
            pick = torch.randint(0, self.branches, log_pi.shape[:-1], device=log_pi.device)
            return F.one_hot(pick, self.branches).to(log_pi.dtype)
        return F.one_hot(log_pi.argmax(-1), self.branches).to(log_pi.dtype)


# --- structure specs (so a saved AmNet rebuilds itself) -------------------------------------------------------

def branched_spec(module: nn.Module) -> dict | None:
    if isinstance(module, BranchedLSTMLayer):
        spec = {"type": "branched_lstm", "kind": module.kind, "input_size": module.input_size,
                "hidden_size": module.hidden_size, "branches": module.branches}
        if module.kind == "mf":
            spec["ranks"] = {s: list(module.ranks[s]) for s in SIDES}
        else:
            spec["nonzeros"] = {s: [module.nonzeros(s, n) for n in range(module.branches)] for s in SIDES}
        return spec
    if isinstance(module, Arbitrator):
        return {"type": "arbitrator", "input_size": module.input_size, "hidden_size": module.hidden_size,
                "num_layers": module.num_layers, "branches": module.branches, "feedback": module.feedback}
    return None


def build_branched(spec: dict) -> nn.Module:
    if spec["type"] == "branched_lstm":
        ranks = {s: tuple(spec["ranks"][s]) for s in SIDES} if spec["kind"] == "mf" else None
        return BranchedLSTMLayer(spec["input_size"], spec["hidden_size"], spec["kind"], ranks=ranks,
                                 branches=spec["branches"])
    return Arbitrator(spec["input_size"], spec["hidden_size"], spec["num_layers"], branches=spec["branches"],
                      feedback=spec["feedback"])
