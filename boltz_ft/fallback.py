"""``FallbackBoltz``: a small pure-torch stand-in for Boltz-2 with the same feature dict and core interface.

For machines or smoke tests without the official model class (boltz.md §5.3, backend ``tiny_fallback``). It
reads the §1.3 feature dict (``res_type``, ``mol_type``, ``residue_index``, ``asym_id``, ``token_pad_mask``,
``token_bonds``, ``atom_to_token``, ``ref_pos``, ``ref_element``, ``ref_charge``, ``atom_pad_mask``; targets
``coords``, ``atom_resolved_mask``) and offers :class:`boltz_ft.core.Boltz2Core`'s methods (``trunk``,
``denoise``, ``diffusion_loss``, ``sample``, ``confidence``), so :class:`boltz_ft.sft.Boltz2SFT` and
:class:`boltz_ft.policy.BoltzPolicy` use it as its own core.

What is Boltz-2's and what is not:

- **Same as boltz** (``AtomDiffusion``): EDM preconditioning c_in = (σ²+σ_d²)^−½, c_skip = σ_d²/(σ²+σ_d²),
  c_out = σσ_d(σ²+σ_d²)^−½, c_noise = ¼ ln(σ/σ_d); training noise σ = σ_d·exp(P_mean + P_std·n), one level per
  structure shared by its copies (``synchronize_sigmas``), the truth centred, randomly rotated and translated;
  the loss of :mod:`boltz_ft.losses` (boltz's, per structure); the sampler: schedule
  σ_k = σ_d(σ_max^{1/ρ} + k/(n−1)(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ then 0, churn γ_0 while the next σ > γ_min,
  noise ``noise_scale``²(t̂² − σ_k²), a fresh random rigid motion per step, the noisy input Kabsch-aligned onto
  the denoised one (``alignment_reverse_diff``) and the step x̃ + step_scale·(σ_{k+1} − t̂)(x̃ − x̂)/t̂.
- **Not boltz** (the networks, ~0.1 M parameters): trunk = token embedding (res_type, mol_type one-hots and
  the token's pooled atom elements) + relative position (clipped residue-index difference within a chain) +
  token bonds -> pair; ``num_blocks`` blocks of single/pair MLPs, outer sums and pair-biased single attention;
  distogram = Linear on the symmetrised pair. Denoiser: a per-atom MLP on [c_in·x, ref_pos, the token's
  single, Fourier(c_noise)], one pair-biased token attention over atoms pooled to tokens, broadcast back,
  and a Linear to 3 that is **not** zero-initialised (LoRA's B is zero, so the base output must carry signal
  for adapters to get a gradient at step 0). No MSA, templates or confidence head.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from boltz_ft.core import Trunk
from boltz_ft.losses import mean_loss, structure_losses, weighted_kabsch_align

__all__ = ["FallbackBoltz", "random_rotations"]

DIFFUSION_DEFAULTS = {"sigma_min": 1e-4, "sigma_max": 160.0, "sigma_data": 16.0, "rho": 7.0, "P_mean": -1.2,
                      "P_std": 1.5, "gamma_0": 0.8, "gamma_min": 1.0, "noise_scale": 1.003, "step_scale": 1.5,
                      "coordinate_augmentation": True, "alignment_reverse_diff": True, "synchronize_sigmas": True}
"""boltz predict's ``diffusion_process_args`` (boltz.md §1.1)."""

NUM_TOKENS, NUM_MOL_TYPES, NUM_ELEMENTS = 33, 4, 128  # boltz const.num_tokens, chain types, elements


def random_rotations(n: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """``[n, 3, 3]`` uniformly random rotations (normalised Gaussian quaternions, as boltz's ``random_rotations``)."""
    q = torch.randn(n, 4, dtype=dtype, device=device)
    q = q / q.norm(dim=-1, keepdim=True) * torch.where(q[:, :1] < 0, -1.0, 1.0)
    r, i, j, k = q.unbind(-1)
    return torch.stack([1 - 2 * (j * j + k * k), 2 * (i * j - k * r), 2 * (i * k + j * r),
                        2 * (i * j + k * r), 1 - 2 * (i * i + k * k), 2 * (j * k - i * r),
                        2 * (i * k - j * r), 2 * (j * k + i * r), 1 - 2 * (i * i + j * j)], -1).view(n, 3, 3)


def _mlp(width: int, hidden: int) -> nn.Sequential:
    """Pre-norm two-layer transition (``.0`` LayerNorm, ``.1`` / ``.3`` Linear: LoRA targets)."""
    return nn.Sequential(nn.LayerNorm(width), nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, width))


class PairBiasedAttention(nn.Module):
    """Multi-head self-attention over tokens with a bias from the pair representation.

    ``x [B, N, d]``, ``z [B, N, N, token_z]``, ``mask [B, N]`` -> ``[B, N, d]`` (residual update).
    """

    def __init__(self, dim: int, token_z: int, num_heads: int) -> None:
        super().__init__()
        self.heads = num_heads
        self.norm = nn.LayerNorm(dim)
        self.proj_q, self.proj_k, self.proj_v = (nn.Linear(dim, dim) for _ in range(3))
        self.proj_z = nn.Linear(token_z, num_heads, bias=False)
        self.proj_o = nn.Linear(dim, dim)

    def forward(self, x: Tensor, z: Tensor, mask: Tensor) -> Tensor:
        b, n, d = x.shape
        h = self.norm(x)
        q, k, v = (p(h).view(b, n, self.heads, d // self.heads).transpose(1, 2) for p in
                   (self.proj_q, self.proj_k, self.proj_v))
        logits = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads) + self.proj_z(z).permute(0, 3, 1, 2)
        logits = logits.masked_fill(mask[:, None, None, :] < 0.5, -1e4)
        out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)
        return self.proj_o(out)


class TrunkBlock(nn.Module):
    """Single transition, outer sum into the pair, pair transition, pair-biased single attention."""

    def __init__(self, token_s: int, token_z: int, num_heads: int) -> None:
        super().__init__()
        self.transition_s = _mlp(token_s, 2 * token_s)
        self.outer_norm = nn.LayerNorm(token_s)
        self.outer_i, self.outer_j = nn.Linear(token_s, token_z), nn.Linear(token_s, token_z)
        self.transition_z = _mlp(token_z, 2 * token_z)
        self.attention = PairBiasedAttention(token_s, token_z, num_heads)

    def forward(self, s: Tensor, z: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        s = s + self.transition_s(s)
        h = self.outer_norm(s)
        z = z + self.outer_i(h)[:, :, None] + self.outer_j(h)[:, None, :]
        z = z + self.transition_z(z)
        s = s + self.attention(s, z, mask)
        return s, z


class Denoiser(nn.Module):
    """``F(c_in·x, c_noise)``: atom MLP, pooled pair-biased token attention, broadcast back, Linear to 3."""

    def __init__(self, token_s: int, token_z: int, atom_s: int, dim_fourier: int, num_heads: int) -> None:
        super().__init__()
        self.fourier = nn.Linear(1, dim_fourier)  # fixed random features (boltz's FourierEmbedding)
        nn.init.normal_(self.fourier.weight)
        nn.init.normal_(self.fourier.bias)
        self.fourier.requires_grad_(False)
        self.atom_in = nn.Linear(3 + 3 + token_s + dim_fourier, atom_s)
        self.atom_mlp = _mlp(atom_s, 2 * atom_s)
        self.token_in = nn.Linear(atom_s + token_s, token_s)
        self.token_attention = PairBiasedAttention(token_s, token_z, num_heads)
        self.token_out = nn.Linear(token_s, atom_s)
        self.atom_mlp_out = _mlp(atom_s, 2 * atom_s)
        self.out_norm = nn.LayerNorm(atom_s)
        self.coords_out = nn.Linear(atom_s, 3)  # default (non-zero) init: see the module docstring

    def forward(self, r_noisy: Tensor, c_noise: Tensor, trunk: Trunk, feats: Mapping[str, Tensor],
                multiplicity: int) -> Tensor:
        """r_noisy ``[B·mult, M, 3]``, c_noise ``[B·mult]`` -> the update ``[B·mult, M, 3]``."""
        atom_to_token = feats["atom_to_token"].float().repeat_interleave(multiplicity, 0)  # [Bm, M, N]
        s = trunk.conditioning["s_cond"].repeat_interleave(multiplicity, 0)  # [Bm, N, token_s]
        z = trunk.z.repeat_interleave(multiplicity, 0)
        token_mask = feats["token_pad_mask"].float().repeat_interleave(multiplicity, 0)
        ref_pos = feats["ref_pos"].float().repeat_interleave(multiplicity, 0)
        noise = torch.cos(2 * math.pi * self.fourier(c_noise[:, None].float()))  # [Bm, dim_fourier]
        a = torch.cat([r_noisy, ref_pos, atom_to_token @ s, noise[:, None].expand(-1, r_noisy.shape[1], -1)], -1)
        a = self.atom_in(a)
        a = a + self.atom_mlp(a)
        counts = atom_to_token.sum(1).clamp(min=1).unsqueeze(-1)  # [Bm, N, 1] atoms per token
        t = self.token_in(torch.cat([atom_to_token.transpose(1, 2) @ a / counts, s], -1))
        t = t + self.token_attention(t, z, token_mask)
        a = a + atom_to_token @ self.token_out(t)
        a = a + self.atom_mlp_out(a)
        return self.coords_out(self.out_norm(a))


class FallbackBoltz(nn.Module):
    """A small Boltz-2-shaped model: same feature dict, same core interface as ``Boltz2Core`` (module docstring).

    Args:
        seed: seed of the weight initialisation (the global RNG is left as it was).
        token_s, token_z, atom_s: single, pair and atom widths.
        num_blocks: trunk blocks. num_heads: attention heads (must divide token_s).
        num_bins: distogram bins (64, 2-22 Å, as the ``disto_target`` feature).
        dim_fourier: Fourier features of the noise level. max_relative_position: residue-index clip r_max.
        diffusion_process_args: boltz's ``diffusion_process_args`` keys (:data:`DIFFUSION_DEFAULTS`).
    """

    confidence_prediction = False  # no confidence head (Boltz2SFT refuses confidence_samples > 0)

    def __init__(self, seed: int = 0, token_s: int = 32, token_z: int = 16, atom_s: int = 32, num_blocks: int = 2,
                 num_heads: int = 2, num_bins: int = 64, dim_fourier: int = 16, max_relative_position: int = 32,
                 diffusion_process_args: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        args = dict(diffusion_process_args or {})
        unknown = sorted(set(args) - set(DIFFUSION_DEFAULTS))
        if unknown:
            raise ValueError(f"unknown diffusion_process_args {unknown}; known: {sorted(DIFFUSION_DEFAULTS)}")
        if token_s % num_heads:
            raise ValueError(f"num_heads ({num_heads}) must divide token_s ({token_s})")
        self.diffusion_args = {**DIFFUSION_DEFAULTS, **args}
        self.num_bins, self.r_max = int(num_bins), int(max_relative_position)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            self.atom_embed = nn.Linear(NUM_ELEMENTS + 1, token_s)
            self.token_embed = nn.Linear(NUM_TOKENS + NUM_MOL_TYPES, token_s)
            self.s_init = nn.Linear(token_s, token_s)
            self.z_init_1, self.z_init_2 = nn.Linear(token_s, token_z), nn.Linear(token_s, token_z)
            self.rel_pos = nn.Linear(2 * self.r_max + 2, token_z, bias=False)
            self.token_bonds = nn.Linear(1, token_z, bias=False)
            self.s_norm, self.z_norm = nn.LayerNorm(token_s), nn.LayerNorm(token_z)
            self.s_recycle, self.z_recycle = nn.Linear(token_s, token_s), nn.Linear(token_z, token_z)
            self.trunk_mlp = nn.ModuleList(TrunkBlock(token_s, token_z, num_heads) for _ in range(num_blocks))
            self.distogram = nn.Linear(token_z, self.num_bins)
            with torch.no_grad():  # small, not zero: near-uniform logits at init (CE ~ ln 64, as boltz's tiny model)
                self.distogram.weight.mul_(0.1)
            self.s_cond = nn.Sequential(nn.LayerNorm(2 * token_s), nn.Linear(2 * token_s, token_s))
            self.denoiser = Denoiser(token_s, token_z, atom_s, dim_fourier, num_heads)

    @property
    def sigma_data(self) -> float:
        return float(self.diffusion_args["sigma_data"])

    # ------------------------------------------------------------------ trunk

    def _relative_position(self, feats: Mapping[str, Tensor]) -> Tensor:
        """``[B, N, N, 2·r_max + 2]`` one-hot of clip(i − j, ±r_max) within a chain, last class across chains."""
        idx, asym = feats["residue_index"].long(), feats["asym_id"].long()
        d = (idx[:, :, None] - idx[:, None, :]).clamp(-self.r_max, self.r_max) + self.r_max
        d = torch.where(asym[:, :, None] == asym[:, None, :], d, torch.full_like(d, 2 * self.r_max + 1))
        return nn.functional.one_hot(d, 2 * self.r_max + 2).float()

    def trunk(self, feats: Mapping[str, Tensor], recycling_steps: int = 0, grad: bool = True) -> Trunk:
        """Embed, recycle ``recycling_steps`` times (only the last pass keeps gradients, as boltz), distogram.

        Returns a :class:`Trunk` with ``s_inputs``/``s`` ``[B, N, token_s]``, ``z`` ``[B, N, N, token_z]``,
        ``pdistogram`` ``[B, N, N, 1, num_bins]`` and ``conditioning = {"s_cond": [B, N, token_s]}``.
        """
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            atom_to_token = feats["atom_to_token"].float()  # [B, M, N]
            atom_feats = torch.cat([feats["ref_element"].float(), feats["ref_charge"].float().unsqueeze(-1)], -1)
            atom_feats = atom_feats * feats["atom_pad_mask"].float().unsqueeze(-1)
            pooled = atom_to_token.transpose(1, 2) @ self.atom_embed(atom_feats)
            pooled = pooled / atom_to_token.sum(1).clamp(min=1).unsqueeze(-1)  # mean over the token's atoms
            mol_type = nn.functional.one_hot(feats["mol_type"].long(), NUM_MOL_TYPES).float()
            s_inputs = self.token_embed(torch.cat([feats["res_type"].float(), mol_type], -1)) + pooled
            s_init = self.s_init(s_inputs)
            z_init = self.z_init_1(s_inputs)[:, :, None] + self.z_init_2(s_inputs)[:, None, :]
            z_init = z_init + self.rel_pos(self._relative_position(feats))
            z_init = z_init + self.token_bonds(feats["token_bonds"].float())
            mask = feats["token_pad_mask"].float()
            s, z = torch.zeros_like(s_init), torch.zeros_like(z_init)
            for i in range(recycling_steps + 1):
                with torch.set_grad_enabled(torch.is_grad_enabled() and i == recycling_steps):
                    s = s_init + self.s_recycle(self.s_norm(s))
                    z = z_init + self.z_recycle(self.z_norm(z))
                    for block in self.trunk_mlp:
                        s, z = block(s, z, mask)
            logits = self.distogram(z + z.transpose(1, 2))  # symmetric, as boltz's DistogramModule
            s_cond = self.s_cond(torch.cat([s, s_inputs], -1))
        return Trunk(s_inputs, s, z, logits.unsqueeze(3), {"s_cond": s_cond})

    # ------------------------------------------------------------------ EDM

    def _precondition(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """boltz's ``c_in, c_skip, c_out`` ``[B, 1, 1]`` and ``c_noise`` ``[B]`` of noise levels ``[B]``."""
        sd = self.sigma_data
        padded = sigma[:, None, None]
        c_in = 1 / torch.sqrt(padded ** 2 + sd ** 2)
        c_skip = sd ** 2 / (padded ** 2 + sd ** 2)
        c_out = padded * sd / torch.sqrt(sd ** 2 + padded ** 2)
        c_noise = torch.log((sigma / sd).clamp(min=1e-20)) * 0.25
        return c_in, c_skip, c_out, c_noise

    def denoise(self, trunk: Trunk, feats: Mapping[str, Tensor], x_noisy: Tensor, sigma: Tensor | float,
                multiplicity: int) -> Tensor:
        """``D(x, σ) = c_skip·x + c_out·F(c_in·x, c_noise)``: x_noisy ``[B·mult, M, 3]``, σ ``[B·mult]`` -> same."""
        if not torch.is_tensor(sigma) or sigma.dim() == 0:
            sigma = torch.full((x_noisy.shape[0],), float(sigma), device=x_noisy.device)
        c_in, c_skip, c_out, c_noise = self._precondition(sigma.float())
        update = self.denoiser(c_in * x_noisy, c_noise, trunk, feats, multiplicity)
        return c_skip * x_noisy + c_out * update

    def diffusion_loss(self, trunk: Trunk, feats: Mapping[str, Tensor], multiplicity: int,
                       per_structure: bool = False, **loss_args: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """boltz's training denoise step (``AtomDiffusion.forward``) and EDM loss (``compute_loss``).

        Args:
            feats: with ``coords`` ``[B, 1, M, 3]``. multiplicity: noise levels per structure.
            per_structure: return ``[B·mult]`` values instead of their means (GRPO's per-sample weights).
            **loss_args: ``add_smooth_lddt_loss``, ``nucleotide_loss_weight``, ``ligand_loss_weight``.
        Returns:
            the loss and ``{"mse_loss", "smooth_lddt_loss"}`` (means over the ``B·mult`` copies, boltz's scalars).
        """
        coords = feats["coords"]
        if coords.dim() != 4 or coords.shape[1] != 1:
            raise ValueError(f"coords must be [B, 1, M, 3] (one conformer); got {tuple(coords.shape)}")
        args, sd = self.diffusion_args, self.sigma_data
        b, device = coords.shape[0], coords.device
        n_sigma = b if args["synchronize_sigmas"] else b * multiplicity
        sigmas = sd * (args["P_mean"] + args["P_std"] * torch.randn(n_sigma, device=device)).exp()
        if args["synchronize_sigmas"]:
            sigmas = sigmas.repeat_interleave(multiplicity, 0)
        truth = coords[:, 0].float().repeat_interleave(multiplicity, 0)  # [Bm, M, 3]
        atom_mask = feats["atom_pad_mask"].float().repeat_interleave(multiplicity, 0).unsqueeze(-1)
        x = truth - (truth * atom_mask).sum(1, keepdim=True) / atom_mask.sum(1, keepdim=True)
        if args["coordinate_augmentation"]:
            x = x @ random_rotations(x.shape[0], x.dtype, device) + torch.randn_like(x[:, :1])
        noised = x + sigmas[:, None, None] * torch.randn_like(x)
        denoised = self.denoise(trunk, feats, noised, sigmas, multiplicity)
        losses = structure_losses(denoised, x, truth, sigmas, feats["atom_to_token"], feats["mol_type"],
                                  feats["atom_resolved_mask"], sd, multiplicity, **loss_args)
        reduce = (lambda t: t) if per_structure else mean_loss
        return reduce(losses["loss"]), {k: reduce(losses[k]) for k in ("mse_loss", "smooth_lddt_loss")}

    def sample_schedule(self, num_sampling_steps: int) -> Tensor:
        """``[num_sampling_steps + 1]`` noise levels σ_k (Angstrom), boltz's schedule, a final 0."""
        a = self.diffusion_args
        inv_rho = 1 / a["rho"]
        steps = torch.arange(num_sampling_steps, dtype=torch.float32)
        sigmas = (a["sigma_max"] ** inv_rho + steps / max(num_sampling_steps - 1, 1)
                  * (a["sigma_min"] ** inv_rho - a["sigma_max"] ** inv_rho)) ** a["rho"]
        return torch.cat([sigmas * self.sigma_data, torch.zeros(1)])

    @torch.no_grad()
    def sample(self, trunk: Trunk, feats: Mapping[str, Tensor], num_sampling_steps: int,
               diffusion_samples: int = 1) -> Tensor:
        """boltz's EDM reverse sampler (steering off; module docstring): ``[B·diffusion_samples, M, 3]``.

        Each step re-centres x (plain mean over all M atoms, as boltz) and applies a fresh random rotation and
        translation, churns to t̂ = σ_k(1 + γ), denoises, Kabsch-aligns the noisy input onto the denoised one
        (weights = atom mask) so the update direction carries no rigid-motion component, and steps to σ_{k+1}.
        """
        a = self.diffusion_args
        atom_mask = feats["atom_pad_mask"].float().repeat_interleave(diffusion_samples, 0)  # [BS, M]
        device = atom_mask.device
        sigmas = self.sample_schedule(num_sampling_steps)
        gammas = torch.where(sigmas > a["gamma_min"], a["gamma_0"], 0.0)
        x = float(sigmas[0]) * torch.randn(*atom_mask.shape, 3, device=device)
        for sigma_tm, sigma_t, gamma in zip(sigmas[:-1].tolist(), sigmas[1:].tolist(), gammas[1:].tolist()):
            x = x - x.mean(dim=-2, keepdim=True)
            x = x @ random_rotations(x.shape[0], x.dtype, device) + torch.randn(x.shape[0], 1, 3, device=device)
            t_hat = sigma_tm * (1 + gamma)
            noise_var = a["noise_scale"] ** 2 * (t_hat ** 2 - sigma_tm ** 2)
            x_noisy = x + math.sqrt(noise_var) * torch.randn_like(x)
            denoised = self.denoise(trunk, feats, x_noisy, t_hat, diffusion_samples)
            if a["alignment_reverse_diff"]:
                x_noisy = weighted_kabsch_align(x_noisy, denoised, atom_mask, atom_mask)
            x = x_noisy + a["step_scale"] * (sigma_t - t_hat) * (x_noisy - denoised) / t_hat
        return x

    def confidence(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """Not available: the fallback has no confidence head."""
        raise NotImplementedError("FallbackBoltz has no confidence head (confidence_prediction = False); use the "
                                  "official Boltz2 (model=boltz/tiny or a checkpoint) for pLDDT / PAE / pTM")
