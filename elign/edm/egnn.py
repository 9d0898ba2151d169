"""EGNN dynamics of EDM (Hoogeboom et al., 2022) on a flat list of valid edges.

Parameter names match upstream ``egnn_dynamics`` (``EGNN_dynamics_QM9.egnn.*``), so an upstream state
dict loads after stripping its ``dynamics.`` prefix (spec edm_checkpoint_format.md §2, §6).

Differences from upstream, all value-preserving:
- Messages are computed only for the valid edges (i != j, both atoms real) instead of all ``N^2``
  padded pairs multiplied by an edge mask; padded atoms never enter the computation.
- The first ``Linear`` of ``edge_mlp`` and ``coord_mlp`` acts on ``[h_i, h_j, d^2, d^2_0]``. Its weight
  is split so the ``h_i`` and ``h_j`` products are computed once per node and gathered to the edges,
  which replaces an ``[E, 2nf + 2] x [2nf + 2, nf]`` matmul by ``[V, nf] x [nf, nf]`` ones.
- Non-finite outputs are zeroed elementwise (ELIGN), not for the whole batch (upstream).

Optional mixed precision (``compute_dtype="bfloat16"``): the per-edge tensors and their matmuls, which
hold nearly all of the FLOPs and memory traffic, run in bfloat16; node features (the residual
stream), coordinates, distances, every sum over edges and the outputs stay in float32. Parameters
stay float32 (they are cast per call, so gradients reach float32 master weights).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from elign.edm import persample
from elign.edm.diffusion import remove_com
from elign.edm.edge_ops import gated_sum, linear, linear_silu, silu, split_first_linear, valid_edges
from elign.engine.errors import ConfigError, check_int, check_range

N_POS = 3
# Per-edge compute dtype by config name; None = the parameters' own dtype (no casts).
COMPUTE_DTYPES: dict[str, torch.dtype | None] = {"float32": None, "bfloat16": torch.bfloat16}


class GCL(nn.Module):
    """Invariant graph convolution sub-layer (upstream ``GCL``): attention-gated messages, sum
    aggregation, residual node update."""

    def __init__(
        self,
        hidden_nf: int,
        edges_in_d: int,
        attention: bool,
        normalization_factor: float,
    ) -> None:
        super().__init__()
        self.attention = attention
        self.normalization_factor = normalization_factor
        self.edge_mlp = nn.Sequential(
            nn.Linear(2 * hidden_nf + edges_in_d, hidden_nf), nn.SiLU(), nn.Linear(hidden_nf, hidden_nf), nn.SiLU()
        )
        self.node_mlp = nn.Sequential(nn.Linear(2 * hidden_nf, hidden_nf), nn.SiLU(), nn.Linear(hidden_nf, hidden_nf))
        if attention:
            self.att_mlp = nn.Sequential(nn.Linear(hidden_nf, 1), nn.Sigmoid())

    def forward(
        self, h: Tensor, row: Tensor, col: Tensor, edge_attr: Tensor, dtype: torch.dtype | None = None
    ) -> Tensor:
        """``h`` ``[V, nf]``, ``row``/``col`` ``[E]``, ``edge_attr`` ``[E, 2]`` -> new ``h`` ``[V, nf]``;
        per-edge work in ``dtype`` (``h``'s if None)."""
        pre = split_first_linear(self.edge_mlp[0], h, row, col, edge_attr, dtype)
        mij = linear_silu(self.edge_mlp[2], silu(pre), "edge")
        gate = torch.sigmoid(linear(self.att_mlp[0], mij, "edge")) if self.attention else None
        agg = gated_sum(mij, gate, row, h.shape[0]).to(h.dtype)
        if self.normalization_factor != 1:
            agg = agg / self.normalization_factor
        node = linear_silu(self.node_mlp[0], torch.cat([h, agg], dim=1), "node")
        return h + linear(self.node_mlp[2], node, "node")


class EquivariantUpdate(nn.Module):
    """Coordinate update (upstream ``EquivariantUpdate``):
    ``x_i += sum_j (x_i - x_j) / (|x_i - x_j| + c) * tanh(coord_mlp(h_i, h_j, e_ij)) * coords_range``."""

    def __init__(
        self,
        hidden_nf: int,
        edges_in_d: int,
        tanh: bool,
        coords_range: float,
        normalization_factor: float,
    ) -> None:
        super().__init__()
        self.tanh = tanh
        self.coords_range = coords_range
        self.normalization_factor = normalization_factor
        last = nn.Linear(hidden_nf, 1, bias=False)
        # Tiny last layer: the network starts close to the identity map on coordinates (upstream).
        nn.init.xavier_uniform_(last.weight, gain=0.001)
        self.coord_mlp = nn.Sequential(
            nn.Linear(2 * hidden_nf + edges_in_d, hidden_nf),
            nn.SiLU(),
            nn.Linear(hidden_nf, hidden_nf),
            nn.SiLU(),
            last,
        )

    def forward(
        self, h: Tensor, x: Tensor, row: Tensor, col: Tensor, coord_diff: Tensor, edge_attr: Tensor,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """``h`` ``[V, nf]``, ``x`` ``[V, 3]``, ``coord_diff`` ``[E, 3]``, ``edge_attr`` ``[E, 2]``
        -> ``x`` ``[V, 3]``; per-edge work in ``dtype`` (``h``'s if None)."""
        pre = split_first_linear(self.coord_mlp[0], h, row, col, edge_attr, dtype)
        hidden = linear_silu(self.coord_mlp[2], silu(pre), "edge")
        scale = linear(self.coord_mlp[4], hidden, "edge").to(x.dtype)
        if self.tanh:
            scale = torch.tanh(scale) * self.coords_range
        agg = x.new_zeros(x.shape).index_add_(0, row, coord_diff * scale)
        if self.normalization_factor != 1:
            agg = agg / self.normalization_factor
        return x + agg


class EquivariantBlock(nn.Module):
    """``inv_sublayers`` GCLs (``gcl_0`` ...) then one coordinate update (``gcl_equiv``)."""

    def __init__(
        self,
        hidden_nf: int,
        inv_sublayers: int,
        attention: bool,
        tanh: bool,
        coords_range: float,
        norm_constant: float,
        normalization_factor: float,
    ) -> None:
        super().__init__()
        self.inv_sublayers = inv_sublayers
        self.norm_constant = norm_constant
        for i in range(inv_sublayers):
            self.add_module(f"gcl_{i}", GCL(hidden_nf, 2, attention, normalization_factor))
        self.gcl_equiv = EquivariantUpdate(hidden_nf, 2, tanh, coords_range, normalization_factor)

    def forward(
        self, h: Tensor, x: Tensor, row: Tensor, col: Tensor, d2_input: Tensor, dtype: torch.dtype | None = None
    ) -> tuple[Tensor, Tensor]:
        """``h`` ``[V, nf]``, ``x`` ``[V, 3]``, ``d2_input`` ``[E, 1]`` (squared distances at the network
        input) -> ``(h, x)``; per-edge work in ``dtype`` (``h``'s if None)."""
        diff = x.index_select(0, row) - x.index_select(0, col)
        d2 = (diff * diff).sum(dim=1, keepdim=True)
        coord_diff = diff / (torch.sqrt(d2 + 1e-8) + self.norm_constant)
        edge_attr = torch.cat([d2, d2_input], dim=1)
        for i in range(self.inv_sublayers):
            h = self._modules[f"gcl_{i}"](h, row, col, edge_attr, dtype)
        x = self.gcl_equiv(h, x, row, col, coord_diff, edge_attr, dtype)
        return h, x


class EGNN(nn.Module):
    """Embedding, ``num_layers`` equivariant blocks (``e_block_{i}``), output embedding."""

    def __init__(
        self,
        in_nf: int,
        hidden_nf: int,
        num_layers: int,
        inv_sublayers: int,
        attention: bool,
        tanh: bool,
        coords_range: float,
        norm_constant: float,
        normalization_factor: float,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.num_layers = num_layers
        self.gradient_checkpointing = gradient_checkpointing
        self.embedding = nn.Linear(in_nf, hidden_nf)
        self.embedding_out = nn.Linear(hidden_nf, in_nf)
        for i in range(num_layers):
            # Upstream computes coords_range / n_layers but passes the full range to every block.
            block = EquivariantBlock(
                hidden_nf, inv_sublayers, attention, tanh, coords_range, norm_constant, normalization_factor
            )
            self.add_module(f"e_block_{i}", block)

    def forward(
        self, h: Tensor, x: Tensor, row: Tensor, col: Tensor, dtype: torch.dtype | None = None
    ) -> tuple[Tensor, Tensor]:
        """``h`` ``[V, in_nf]``, ``x`` ``[V, 3]`` -> ``(h_out [V, in_nf], x_out [V, 3])``; per-edge work
        in ``dtype`` (the parameters' if None)."""
        diff = x.index_select(0, row) - x.index_select(0, col)
        d2_input = (diff * diff).sum(dim=1, keepdim=True)
        h = linear(self.embedding, h, "node")
        # Under a per-sample tape the backward follows each forward at once: nothing to save.
        recompute = self.gradient_checkpointing and torch.is_grad_enabled() and persample.active_tape() is None
        for i in range(self.num_layers):
            block = self._modules[f"e_block_{i}"]
            if recompute:
                # Keeps only the [V, nf] block inputs; the [E, nf] edge activations are recomputed
                # in backward (one extra forward) instead of being stored for every block.
                h, x = checkpoint(block, h, x, row, col, d2_input, dtype, use_reentrant=False)
            else:
                h, x = block(h, x, row, col, d2_input, dtype)
        return linear(self.embedding_out, h, "node"), x


class EGNNDynamics(nn.Module):
    """Noise predictor ``eps_hat = phi(z_t, t)`` of EDM (upstream ``EGNN_dynamics_QM9``, mode
    ``egnn_dynamics``).

    Args:
        in_node_nf: atom feature channels F (5 one-hot H, C, N, O, F + 1 charge = 6 for QM9).
        hidden_nf: hidden width (256 for the QM9 model).
        num_layers: number of equivariant blocks (9 for the QM9 model).
        attention: gate messages by ``sigmoid(att_mlp(m_ij))``.
        tanh: bound the coordinate update by ``tanh(.) * coords_range``.
        coords_range: coordinate update scale (15, used by every block).
        norm_constant: ``c`` in ``(x_i - x_j) / (|x_i - x_j| + c)``.
        normalization_factor: aggregated sums are divided by this.
        condition_time: append ``t`` as an input feature (the output time channel is dropped).
        inv_sublayers: invariant GCL sub-layers per block (1 for the QM9 model).
        gradient_checkpointing: recompute each block's edge activations in backward instead of
            storing them (~9x less activation memory for the QM9 model, one extra forward).
        compute_dtype: ``float32`` or ``bfloat16``, the dtype of the per-edge activations and
            matmuls (module docstring). ``bfloat16`` is ~2x faster where the hardware has bf16 matmul
            units (AVX512-BF16 / AMX CPUs, Ampere and later GPUs) and slower elsewhere.
    """

    def __init__(
        self,
        in_node_nf: int = 6,
        hidden_nf: int = 256,
        num_layers: int = 9,
        attention: bool = True,
        tanh: bool = True,
        coords_range: float = 15.0,
        norm_constant: float = 1.0,
        normalization_factor: float = 1.0,
        condition_time: bool = True,
        inv_sublayers: int = 1,
        gradient_checkpointing: bool = False,
        compute_dtype: str = "float32",
    ) -> None:
        super().__init__()
        if compute_dtype not in COMPUTE_DTYPES:
            raise ConfigError("compute_dtype", compute_dtype, list(COMPUTE_DTYPES))
        for key, value in (("in_node_nf", in_node_nf), ("hidden_nf", hidden_nf), ("num_layers", num_layers),
                           ("inv_sublayers", inv_sublayers)):
            check_int(key, value, 1)
        check_range("normalization_factor", normalization_factor, 0.0, low_open=True)
        check_range("coords_range", coords_range, 0.0, low_open=True)
        check_range("norm_constant", norm_constant, 0.0)  # 0: unit vectors (x_i - x_j) / |x_i - x_j|
        self.in_node_nf = int(in_node_nf)
        self.condition_time = bool(condition_time)
        self.egnn = EGNN(
            in_nf=self.in_node_nf + int(self.condition_time),
            hidden_nf=int(hidden_nf),
            num_layers=int(num_layers),
            inv_sublayers=int(inv_sublayers),
            attention=bool(attention),
            tanh=bool(tanh),
            coords_range=float(coords_range),
            norm_constant=float(norm_constant),
            normalization_factor=float(normalization_factor),
            gradient_checkpointing=bool(gradient_checkpointing),
        )
        self.compute_dtype = COMPUTE_DTYPES[compute_dtype]

    def forward(self, z: Tensor, t: Tensor, node_mask: Tensor, full_precision: bool | Tensor = False) -> Tensor:
        """Predicted noise.

        Args:
            z: ``[M, N, 3 + F]`` latents ``[x, one_hot / 4, Z / 10]``.
            t: ``[M]`` (or scalar) continuous time in ``[0, 1]``.
            node_mask: ``[M, N]`` bool.
            full_precision: ignore ``compute_dtype`` (the parameters' dtype throughout), for the whole
                call or per molecule (``[M]`` bool; the two sets then run as two sub-batches).
        Returns:
            ``[M, N, 3 + F]``: ``eps_x`` (masked, zero CoM) and ``eps_h``; zero on padding.
        """
        m, n, c = z.shape
        if c != N_POS + self.in_node_nf:
            raise ValueError(f"z has {c} channels, expected 3 + in_node_nf = {N_POS + self.in_node_nf}")
        t = torch.as_tensor(t, dtype=z.dtype, device=z.device).reshape(-1).expand(m)
        node_mask = node_mask.bool()
        if not isinstance(full_precision, Tensor):
            return self._predict(z, t, node_mask, None if full_precision else self.compute_dtype)
        if self.compute_dtype is None or not bool(full_precision.any()):
            return self._predict(z, t, node_mask, self.compute_dtype)
        if bool(full_precision.all()):
            return self._predict(z, t, node_mask, None)
        if persample.active_tape() is not None:
            raise ValueError("per-sample gradients need one precision per call (full_precision a bool)")
        out = torch.zeros_like(z)
        for keep, dtype in ((~full_precision, self.compute_dtype), (full_precision, None)):
            index = keep.nonzero().squeeze(1)
            out = out.index_copy(0, index, self._predict(z[index], t[index], node_mask[index], dtype))
        return out

    def _predict(self, z: Tensor, t: Tensor, node_mask: Tensor, dtype: torch.dtype | None) -> Tensor:
        """:meth:`forward` for ``t`` ``[M]``, a bool mask and one per-edge ``dtype``."""
        m, n, c = z.shape
        nodes, row, col = valid_edges(node_mask)
        tape = persample.active_tape()
        if tape is not None:
            tape.set_molecules(node_mask)
        zv = z.reshape(m * n, c).index_select(0, nodes)
        x, h = zv[:, :N_POS], zv[:, N_POS:]
        if self.condition_time:
            h = torch.cat([h, t.index_select(0, nodes // n).unsqueeze(1)], dim=1)
        h_out, x_out = self.egnn(h, x, row, col, dtype)
        out = torch.cat([x_out - x, h_out[:, : self.in_node_nf]], dim=1)
        dense = z.new_zeros(m * n, c).index_copy(0, nodes, out).view(m, n, c)
        # Zero only the bad entries (ELIGN); must precede the CoM removal, which would spread a NaN.
        dense = torch.where(torch.isfinite(dense), dense, torch.zeros_like(dense))
        return torch.cat([remove_com(dense[..., :N_POS], node_mask), dense[..., N_POS:]], dim=-1)
