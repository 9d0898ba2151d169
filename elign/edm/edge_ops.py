"""The EGNN's per-call kernels, in three flavours chosen per call:

- sampling (no autograd): single-pass oneDNN and ``embedding_bag`` kernels;
- training (autograd): the same ``embedding_bag`` forwards for the edge input and the message sum,
  as ``autograd.Function``s with ``index_add`` backwards, and plain ops elsewhere;
- per-sample gradients (a ``persample.PerSampleTape`` is recording): every ``Linear`` goes through
  the tape, which takes each molecule's weight gradient instead of the batch's.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from elign.edm import persample


def valid_edges(node_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Flat indices of the real atoms and of the ordered pairs of distinct real atoms.

    Args:
        node_mask: ``[M, N]`` bool.
    Returns:
        ``nodes`` ``[V]``: positions of the real atoms in the flattened ``[M * N]`` layout;
        ``row``, ``col`` ``[E]``: edge endpoints as indices into the ``V`` real atoms (messages flow
        ``j = col -> i = row``), grouped by ``row``.
    """
    m, n = node_mask.shape
    flat = node_mask.reshape(-1)
    nodes = flat.nonzero().squeeze(1)
    compact = torch.cumsum(flat.long(), 0) - 1  # padded slot -> index among the real atoms
    eye = torch.eye(n, dtype=torch.bool, device=node_mask.device)
    pairs = node_mask[:, :, None] & node_mask[:, None, :] & ~eye
    b, i, j = pairs.nonzero(as_tuple=True)
    return nodes, compact[b * n + i], compact[b * n + j]


def fast_sampling_kernels(x: Tensor) -> bool:
    """Whether to use the single-pass no-grad kernels (fused post-ops, ``embedding_bag`` sums).

    They round differently from the autograd ops: ~1e-7 relative in float32, ~1e-2 after a few
    layers in bfloat16. PPO ratios do not see this when the trainer recomputes the old log-probs
    with the training forward (``trainer.old_logp=recompute``, the default).
    """
    return not torch.is_grad_enabled() and x.dtype in (torch.float32, torch.bfloat16)


def split_first_linear(
    layer: nn.Linear, h: Tensor, row: Tensor, col: Tensor, edge_attr: Tensor, dtype: torch.dtype | None
) -> Tensor:
    """``layer([h_row, h_col, edge_attr])`` for ``layer: Linear(2nf + d, out)`` without building the
    ``[E, 2nf + d]`` concatenation. ``h`` ``[V, nf]``, ``row``/``col`` ``[E]``, ``edge_attr`` ``[E, d]``
    -> ``[E, out]`` in ``dtype`` (``h``'s dtype if None).

    The ``h_i`` and ``h_j`` products are computed once per node (``[V, out]``, in ``h``'s dtype) and
    gathered to the edges; the ``d`` edge features add a rank-``d`` term.
    """
    nf = h.shape[1]
    w = layer.weight
    dtype = dtype or h.dtype
    if persample.active_tape() is not None:
        src = persample.linear(h, w, layer.bias, "node", (0, nf)).to(dtype)
        dst = persample.linear(h, w, None, "node", (nf, 2 * nf)).to(dtype)
    else:
        src = F.linear(h, w[:, :nf], layer.bias).to(dtype)  # bias folded into the receiver's per-node term
        dst = F.linear(h, w[:, nf : 2 * nf]).to(dtype)
    if torch.is_grad_enabled():
        return _EdgeInput.apply(src, dst, edge_attr.to(dtype), w, 2 * nf, row, col)
    return _gather_pairs(src, dst, edge_attr.to(dtype), w[:, 2 * nf :].to(dtype), row, col)


def _gather_pairs(src: Tensor, dst: Tensor, edge_attr: Tensor, w_edge: Tensor, row: Tensor, col: Tensor) -> Tensor:
    """``src[row] + dst[col] + edge_attr @ w_edge.T`` (``[E, out]``) in one pass: a weighted
    ``embedding_bag`` sums, per edge, the two node rows and the edge-feature columns of the weight
    scaled by the features, with one ``[E, out]`` allocation (the gather-then-add ops write and read
    it three times)."""
    v, e = src.shape[0], row.shape[0]
    table = torch.cat([src, dst, w_edge.t()], dim=0)
    feat_rows = torch.arange(2 * v, 2 * v + edge_attr.shape[1], device=row.device).expand(e, -1)
    index = torch.cat([row.unsqueeze(1), (col + v).unsqueeze(1), feat_rows], dim=1)
    weights = torch.cat([edge_attr.new_ones(e, 2), edge_attr], dim=1)
    return F.embedding_bag(index, table, per_sample_weights=weights, mode="sum")


class _EdgeInput(torch.autograd.Function):
    """:func:`_gather_pairs` with ``w_edge = weight[:, first:]``, differentiable.

    ``embedding_bag``'s own backward sorts the indices (~15 % of a profiled forward + backward); here
    the node gradients are two ``index_add``s. Under a per-sample tape the ``w_edge`` gradient goes
    to the tape, per molecule, instead of to ``weight.grad``."""

    @staticmethod
    def forward(ctx, src: Tensor, dst: Tensor, edge_attr: Tensor, weight: Tensor, first: int,  # type: ignore[override]
                row: Tensor, col: Tensor) -> Tensor:
        w_edge = weight[:, first:].to(src.dtype)
        ctx.save_for_backward(edge_attr, w_edge, row, col)
        ctx.tape, ctx.key, ctx.num_nodes = persample.active_tape(), (id(weight), first, weight.shape[1]), src.shape[0]
        ctx.weight_shape, ctx.weight_dtype = weight.shape, weight.dtype
        return _gather_pairs(src, dst, edge_attr, w_edge, row, col)

    @staticmethod
    def backward(ctx, delta: Tensor):  # type: ignore[override]
        edge_attr, w_edge, row, col = ctx.saved_tensors
        need_src, need_dst, need_attr, need_weight = ctx.needs_input_grad[:4]
        v, out = ctx.num_nodes, delta.shape[1]
        grad_src = delta.new_zeros(v, out).index_add_(0, row, delta) if need_src else None
        grad_dst = delta.new_zeros(v, out).index_add_(0, col, delta) if need_dst else None
        # delta @ w_edge as a linear with the (tiny) transposed weight: MKL's [E, out] x [out, d] mm
        # is ~4x slower for d = 2.
        grad_attr = F.linear(delta, w_edge.t().contiguous()) if need_attr else None
        grad_weight = None
        if ctx.tape is not None:
            ctx.tape.add(ctx.key, edge_attr, delta, "edge", None)
        elif need_weight:
            grad_weight = delta.new_zeros(ctx.weight_shape, dtype=ctx.weight_dtype)
            grad_weight[:, ctx.key[1] :] = delta.t().mm(edge_attr)
        return grad_src, grad_dst, grad_attr, grad_weight, None, None, None


FUSED_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
# oneDNN's bf16 inner product needs AVX512-BF16 / AMX (or AVX512 emulation); on other CPUs it cannot
# even build the primitive, so bf16 takes the plain ops there.
FUSED_LINEAR_BF16 = FUSED_LINEAR and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def linear(layer: nn.Linear, x: Tensor, rows: str) -> Tensor:
    """``layer(x)`` in ``x``'s dtype (parameters cast per call; a no-op in float32). ``rows`` ("node"
    or "edge") says what the rows of ``x`` are, for per-sample gradients (``persample``)."""
    if persample.active_tape() is not None:
        return persample.linear(x, layer.weight, layer.bias, rows)
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    return F.linear(x, layer.weight.to(x.dtype), bias)


def linear_silu(layer: nn.Linear, x: Tensor, rows: str) -> Tensor:
    """``silu(layer(x))`` in ``x``'s dtype. Without gradients on CPU (sampling), one oneDNN call with
    SiLU as a fused post-op: no bias broadcast copy and no separate pass over the ``[E, nf]`` edge
    tensor (~1.5x faster per call). It has no autograd formula, so training uses the plain ops."""
    fused = FUSED_LINEAR_BF16 if x.dtype == torch.bfloat16 else FUSED_LINEAR
    if fused and fast_sampling_kernels(x) and x.device.type == "cpu":
        w, b = layer.weight.to(x.dtype), layer.bias.to(x.dtype)
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "swish", [], "")
    return silu(linear(layer, x, rows))


def gated_sum(msg: Tensor, gate: Tensor | None, row: Tensor, num_nodes: int) -> Tensor:
    """``out[i] = sum_{e: row[e] = i} gate[e] * msg[e]``, accumulated in at least float32 and
    returned in ``msg``'s dtype.

    ``msg`` ``[E, nf]``, ``gate`` ``[E, 1]`` or None, ``row`` ``[E]`` grouped by value -> ``[V, nf]``.
    In float32 and float64 one ``embedding_bag`` over the (sorted) rows reads ``msg`` once; the plain
    ``mul`` + ``index_add`` path writes the gated ``[E, nf]`` tensor first (~3x slower per call).
    """
    if msg.dtype in (torch.float32, torch.float64) or fast_sampling_kernels(msg):
        gate = msg.new_ones(msg.shape[0], 1) if gate is None else gate.to(msg.dtype)
        if torch.is_grad_enabled():
            return _GatedSum.apply(msg, gate, row, num_nodes)
        return _bag_sum(msg, gate, row, num_nodes)
    if gate is not None:
        msg = msg * gate
    acc = torch.promote_types(msg.dtype, torch.float32)
    return msg.new_zeros(num_nodes, msg.shape[1], dtype=acc).index_add_(0, row, msg.to(acc)).to(msg.dtype)


def _bag_sum(msg: Tensor, gate: Tensor, row: Tensor, num_nodes: int) -> Tensor:
    """:func:`gated_sum` as one weighted ``embedding_bag`` (``row`` sorted)."""
    counts = torch.bincount(row, minlength=num_nodes)
    offsets = torch.cumsum(counts, 0) - counts
    index = torch.arange(msg.shape[0], device=msg.device)
    return F.embedding_bag(index, msg, offsets, mode="sum", per_sample_weights=gate.reshape(-1))


class _GatedSum(torch.autograd.Function):
    """:func:`_bag_sum`, differentiable without ``embedding_bag``'s sorting backward."""

    @staticmethod
    def forward(ctx, msg: Tensor, gate: Tensor, row: Tensor, num_nodes: int) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(msg, gate, row)
        return _bag_sum(msg, gate, row, num_nodes)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        msg, gate, row = ctx.saved_tensors
        grad_rows = grad_out.index_select(0, row)
        grad_gate = torch.linalg.vecdot(grad_rows, msg).unsqueeze(1) if ctx.needs_input_grad[1] else None
        grad_msg = grad_rows.mul_(gate) if ctx.needs_input_grad[0] else None
        return grad_msg, grad_gate, None, None


def silu(x: Tensor) -> Tensor:
    # In place when nothing will be differentiated: the [E, nf] edge tensors dominate memory traffic.
    return F.silu(x, inplace=not torch.is_grad_enabled())
