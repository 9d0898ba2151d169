"""The EGNN's edge kernels: their hand-written backwards against autograd through plain ops."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from elign.edm.edge_ops import gated_sum, split_first_linear, valid_edges


def _graph(sizes: list[int], n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mask = torch.arange(n)[None, :] < torch.tensor(sizes)[:, None]
    return valid_edges(mask)


def _plain_first_linear(layer: nn.Linear, h, row, col, edge_attr):
    return layer(torch.cat([h[row], h[col], edge_attr], dim=1))


@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_split_first_linear_equals_the_concatenated_layer(grad: bool) -> None:
    g = torch.Generator().manual_seed(0)
    nodes, row, col = _graph([3, 5, 1, 4], n=5)
    nf, out = 6, 7
    layer = nn.Linear(2 * nf + 2, out).double()
    h = torch.randn(nodes.numel(), nf, generator=g, dtype=torch.float64)
    edge_attr = torch.randn(row.numel(), 2, generator=g, dtype=torch.float64)
    with torch.set_grad_enabled(grad):
        fast = split_first_linear(layer, h, row, col, edge_attr, None)
    torch.testing.assert_close(fast, _plain_first_linear(layer, h, row, col, edge_attr).detach(), rtol=0, atol=1e-12)


def test_split_first_linear_gradients_equal_autograd_of_the_concatenated_layer() -> None:
    g = torch.Generator().manual_seed(1)
    nodes, row, col = _graph([4, 2, 6], n=6)
    nf, out = 5, 3
    layer = nn.Linear(2 * nf + 2, out).double()
    h = torch.randn(nodes.numel(), nf, generator=g, dtype=torch.float64, requires_grad=True)
    edge_attr = torch.randn(row.numel(), 2, generator=g, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(row.numel(), out, generator=g, dtype=torch.float64)
    grads = []
    for fn in (split_first_linear, lambda *a: _plain_first_linear(*a[:5])):
        layer.zero_grad()
        h.grad = edge_attr.grad = None
        (fn(layer, h, row, col, edge_attr, None) * weights).sum().backward()
        grads.append([h.grad, edge_attr.grad, layer.weight.grad, layer.bias.grad])
    for fast, plain in zip(*grads):
        assert plain.abs().max() > 1e-3
        torch.testing.assert_close(fast, plain, rtol=0, atol=1e-12)


@pytest.mark.parametrize("with_gate", [True, False])
def test_gated_sum_and_its_gradients_equal_the_plain_ops(with_gate: bool) -> None:
    g = torch.Generator().manual_seed(2)
    nodes, row, col = _graph([5, 3, 4], n=5)
    v, e = nodes.numel(), row.numel()
    msg = torch.randn(e, 4, generator=g, dtype=torch.float64, requires_grad=True)
    gate = torch.rand(e, 1, generator=g, dtype=torch.float64).requires_grad_(with_gate) if with_gate else None
    weights = torch.randn(v, 4, generator=g, dtype=torch.float64)

    def plain():
        gated = msg * gate if gate is not None else msg
        return torch.zeros(v, 4, dtype=torch.float64).index_add(0, row, gated)

    results = []
    for fn in (lambda: gated_sum(msg, gate, row, v), plain):
        msg.grad = None
        if gate is not None:
            gate.grad = None
        out = fn()
        (out * weights).sum().backward()
        results.append([out.detach(), msg.grad] + ([gate.grad] if gate is not None else []))
    for fast, ref in zip(*results):
        torch.testing.assert_close(fast, ref, rtol=0, atol=1e-12)
    with torch.no_grad():  # the sampling kernel
        torch.testing.assert_close(gated_sum(msg, gate, row, v), results[1][0], rtol=0, atol=1e-12)


def test_gated_sum_sums_into_nodes_without_edges() -> None:
    # A single-atom molecule has no edges: its row of the sum is zero, also through the bag kernel.
    nodes, row, col = _graph([1, 3], n=3)
    msg = torch.ones(row.numel(), 2)
    out = gated_sum(msg, None, row, nodes.numel())
    assert out[0].eq(0).all() and out[1:].eq(2).all()
