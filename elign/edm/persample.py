"""Per-sample weight gradients of the EGNN, accumulated over the steps of a rollout.

Why: with one on-policy optimizer step per iteration and one advantage per trajectory, the policy
gradient is ``sum_i c_i G_i`` with ``G_i = sum_t grad log p_{i,t}`` and ``c_i`` known only once
the rewards are in. If the sampler backpropagates each step's log-prob at once and keeps ``G_i``
per sample, the update needs no second forward pass: ~25 % of the iteration's FLOPs.

How: inside :meth:`PerSampleTape.record`, every ``Linear`` of the EGNN runs through
:class:`_PerSampleLinear` (the first edge layer's rank-2 distance columns through
``edge_ops._EdgeInput``, which feeds the tape the same way). Its backward returns the input
gradient as usual but, instead of the batch's weight gradient, adds each molecule's own
``delta^T x`` (one ``bmm`` per run of equal-sized molecules, the same FLOPs) to that sample's
accumulator. Molecules of a batch never
interact, so the backward of ``sum_i log p_i`` gives every row its own sample's ``delta``.
Rows of node tensors and of edge tensors are grouped by molecule (``valid_edges``), which makes a
run of ``k`` molecules with ``n`` atoms a ``[k, n, d]`` (nodes) or ``[k, n (n - 1), d]`` (edges) view.

Node-level maps have few rows per molecule (``n``), so a per-step ``bmm`` would mostly move its
``[k, out, in]`` accumulator through memory (2.8 of 10.7 ms per molecule and step at 9 x 256).
Their ``(x, delta)`` are copied into preallocated buffers instead and folded in with one ``bmm``
over many steps' rows when the buffers are full (``stash_mib``) and before ``accumulate``.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import torch
from torch import Tensor, nn

_ACTIVE: contextvars.ContextVar["PerSampleTape | None"] = contextvars.ContextVar("per_sample_tape", default=None)


def active_tape() -> "PerSampleTape | None":
    """The tape recording the current forward, if any."""
    return _ACTIVE.get()


class PerSampleTape:
    """Accumulators ``[B, *shape]`` of per-sample gradients for the parameters of ``module``.

    Args:
        module: the network whose parameters are tracked (all of them must be used in ``Linear``
            maps routed through :func:`linear`, or in ``edge_ops._EdgeInput``).
        batch_size: ``B``, samples in the rollout.
        stash_mib: memory for node-level ``(x, delta)`` copies before they are folded in; the
            number of steps it holds is set after the first recorded step.
    """

    def __init__(self, module: nn.Module, batch_size: int, stash_mib: float = 64.0) -> None:
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.batch_size = int(batch_size)
        # (id(param), first column, end column) -> [B, out, cols] or [B, out] (bias) accumulators.
        self.acc: dict[tuple[int, int, int], Tensor] = {}
        self._runs: dict[str, tuple[tuple[int, int, int], ...]] | None = None
        self._rows: dict[str, int] = {}  # rows the declared molecules cover, per kind
        self._first_sample = 0
        self._stashes: dict[tuple[int, int, int], _NodeStash] = {}
        self._stash_limit, self._step_bytes = int(stash_mib * 2**20), 0
        self._stash_steps: int | None = None  # unknown until one step's node-level bytes are seen

    @contextlib.contextmanager
    def record(self, first_sample: int) -> Iterator["PerSampleTape"]:
        """Route the EGNN's linear maps through the tape; the forward's molecules are the samples
        ``first_sample, first_sample + 1, ...`` of the rollout, in order."""
        token = _ACTIVE.set(self)
        self._first_sample = int(first_sample)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)
            self._runs = None
            if self._stash_steps is None and self._step_bytes:
                self._stash_steps = max(1, self._stash_limit // self._step_bytes)

    def set_molecules(self, node_mask: Tensor) -> None:
        """Declare the molecules of the current forward (``node_mask`` ``[M, N]`` bool), whose node
        and edge rows are grouped by molecule in batch order."""
        counts = node_mask.sum(dim=1).tolist()
        if self._first_sample + len(counts) > self.batch_size:
            raise ValueError(f"samples {self._first_sample}..{self._first_sample + len(counts) - 1} "
                             f"exceed the tape's batch of {self.batch_size}")
        runs: dict[str, list[tuple[int, int, int]]] = {"node": [], "edge": []}
        start = 0
        while start < len(counts):
            end = start
            while end < len(counts) and counts[end] == counts[start]:
                end += 1
            n, sample = int(counts[start]), self._first_sample + start
            runs["node"].append((sample, end - start, n))
            runs["edge"].append((sample, end - start, n * (n - 1)))
            start = end
        self._runs = {kind: tuple(r) for kind, r in runs.items()}
        self._rows = {kind: sum(k * r for _, k, r in kind_runs) for kind, kind_runs in self._runs.items()}

    def add(self, key: tuple[int, int, int], x: Tensor, grad_out: Tensor, rows: str, bias: Tensor | None) -> None:
        """Add each sample's ``grad_out^T x`` (and bias gradient ``sum grad_out``) to its accumulator.

        ``x`` ``[R, d_in]``, ``grad_out`` ``[R, d_out]``; ``rows`` is "node" or "edge".
        """
        if self._runs is None:
            raise RuntimeError("the EGNN forward did not declare its molecules (set_molecules)")
        runs = self._runs[rows]
        if self._rows[rows] != x.shape[0]:
            raise RuntimeError(f"{rows} rows: the declared molecules cover {self._rows[rows]}, "
                               f"the tensor has {x.shape[0]}")
        if rows == "node" and self._stash_steps is None:
            self._step_bytes += (x.shape[1] + grad_out.shape[1]) * x.shape[0] * x.element_size()
        if rows == "edge" or self._stash_steps is None:
            row = 0
            for sample, k, r in runs:
                rows_x, rows_g = x[row : row + k * r], grad_out[row : row + k * r]
                self._add_run(key, bias, sample, rows_x.view(k, r, -1), rows_g.view(k, r, -1))
                row += k * r
            return
        stash = self._stashes.get(key)
        if stash is None or stash.runs != runs:  # first use, or another chunk of the rollout
            self._fold(key)
            stash = self._stashes[key] = _NodeStash(runs, x, grad_out, bias, self._stash_steps)
        if stash.append(x, grad_out):
            self._fold(key)

    def flush(self) -> None:
        """Fold every stashed node-level step into the accumulators and free the buffers."""
        for key in list(self._stashes):
            self._fold(key)
        self._stashes.clear()

    def _fold(self, key: tuple[int, int, int]) -> None:
        """One ``bmm`` per run of molecules over all the steps held in ``key``'s stash."""
        stash = self._stashes.get(key)
        if stash is None:
            return
        for sample, xs, gs in stash.filled_runs():
            self._add_run(key, stash.bias, sample, xs, gs)
        stash.filled = 0

    def _add_run(self, key: tuple[int, int, int], bias: Tensor | None, sample: int, xs: Tensor, gs: Tensor) -> None:
        """``acc[sample + j] += gs[j]^T xs[j]`` for the ``k`` molecules of a run (``xs`` ``[k, r, in]``,
        ``gs`` ``[k, r, out]``), and the bias gradient ``gs[j].sum(0)``."""
        k, d_in, d_out = xs.shape[0], xs.shape[2], gs.shape[2]
        acc = self._accumulator(key, (d_out, d_in))[sample : sample + k]
        if d_in < 8:  # the rank-2 distance term: [k, in, r] x [k, r, out] is the fast orientation
            acc.add_(torch.bmm(xs.transpose(1, 2), gs).transpose(1, 2).to(acc.dtype))
        elif xs.dtype == acc.dtype:
            acc.baddbmm_(gs.transpose(1, 2), xs)
        else:  # bf16 compute: the product in bf16 (as autograd's weight gradient), summed in fp32
            acc.add_(torch.bmm(gs.transpose(1, 2), xs).to(acc.dtype))
        if bias is not None:
            self._accumulator((id(bias), 0, 0), (d_out,))[sample : sample + k].add_(gs.sum(dim=1, dtype=acc.dtype))

    def accumulate(self, weights: Tensor) -> None:
        """Add ``sum_i weights[i] * G_i`` to each parameter's ``.grad`` (``weights`` ``[B]``)."""
        if weights.shape != (self.batch_size,):
            raise ValueError(f"weights must be [B]={self.batch_size}, got {tuple(weights.shape)}")
        self.flush()
        by_id = {id(p): p for p in self.params}
        grads = {id(p): torch.zeros_like(p) for p in self.params}
        for (pid, first, end), acc in self.acc.items():
            g = (weights.to(acc) @ acc.reshape(self.batch_size, -1)).view(acc.shape[1:])
            target = grads[pid] if end == 0 else grads[pid][:, first:end]
            target.add_(g.to(target.dtype))
        for pid, g in grads.items():
            p = by_id[pid]
            p.grad = g if p.grad is None else p.grad.add_(g)

    def _accumulator(self, key: tuple[int, int, int], shape: tuple[int, ...]) -> Tensor:
        acc = self.acc.get(key)
        if acc is None:
            param = next((p for p in self.params if id(p) == key[0]), None)
            if param is None:
                raise KeyError("a linear map of the forward uses a tensor that is not a tracked parameter")
            acc = self.acc[key] = torch.zeros(self.batch_size, *shape, dtype=param.dtype, device=param.device)
        return acc


class _PerSampleLinear(torch.autograd.Function):
    """``F.linear(x, weight[:, first:end], bias)`` whose backward feeds the tape instead of ``.grad``."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, tape: PerSampleTape,  # type: ignore[override]
                key: tuple[int, int, int], rows: str) -> Tensor:
        w = weight[:, key[1] : key[2]].to(x.dtype)
        ctx.save_for_backward(x, w)
        ctx.tape, ctx.key, ctx.rows, ctx.bias = tape, key, rows, bias
        return nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        x, w = ctx.saved_tensors
        ctx.tape.add(ctx.key, x, grad_out, ctx.rows, ctx.bias)
        grad_x = None
        if ctx.needs_input_grad[0]:
            # One output (attention, coordinate scale): a broadcast product, not a K = 1 matmul
            # (~4 % of the step, interleaved A/B).
            grad_x = grad_out * w if w.shape[0] == 1 else grad_out.mm(w)
        return grad_x, None, None, None, None, None


def linear(x: Tensor, weight: Tensor, bias: Tensor | None, rows: str, columns: tuple[int, int] | None = None) -> Tensor:
    """``x @ weight[:, columns].T + bias`` in ``x``'s dtype, recorded per sample on the active tape.

    ``rows`` ("node" or "edge") says how the rows of ``x`` map to molecules.
    """
    tape = active_tape()
    if tape is None:
        raise RuntimeError("per-sample linear outside PerSampleTape.record()")
    first, end = columns or (0, weight.shape[1])
    # The weight is an input only so that autograd calls the backward (it returns no weight grad).
    return _PerSampleLinear.apply(x, weight, bias, tape, (id(weight), first, end), rows)


class _NodeStash:
    """Copies of one node-level map's ``(x, delta)`` over up to ``capacity`` steps, per run of
    molecules ``[k, capacity * r, d]``, so a fold is one ``bmm`` per run without any concatenation."""

    def __init__(self, runs: tuple[tuple[int, int, int], ...], x: Tensor, g: Tensor, bias: Tensor | None,
                 capacity: int) -> None:
        self.runs, self.bias, self.capacity, self.filled = runs, bias, capacity, 0
        self.xs = [x.new_empty(k, capacity * r, x.shape[1]) for _, k, r in runs]
        self.gs = [g.new_empty(k, capacity * r, g.shape[1]) for _, k, r in runs]

    def append(self, x: Tensor, g: Tensor) -> bool:
        """Copy one step's rows in; True when the buffers are full."""
        row, f = 0, self.filled
        for (_, k, r), xb, gb in zip(self.runs, self.xs, self.gs):
            xb[:, f * r : (f + 1) * r].copy_(x[row : row + k * r].view(k, r, -1))
            gb[:, f * r : (f + 1) * r].copy_(g[row : row + k * r].view(k, r, -1))
            row += k * r
        self.filled += 1
        return self.filled == self.capacity

    def filled_runs(self) -> Iterator[tuple[int, Tensor, Tensor]]:
        for (sample, _, r), xb, gb in zip(self.runs, self.xs, self.gs):
            yield sample, xb[:, : self.filled * r], gb[:, : self.filled * r]
