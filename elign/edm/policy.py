"""EDM reverse diffusion as a Gaussian policy (spec elign.md §1.1, §1.2).

A trajectory is ``z_T, z_{T-1}, ..., z_0`` over ``T`` strided steps of the 1000-step schedule; column
``j = 0..T-1`` of ``logp_old`` is the transition from time ``t = (T - j) / T`` to ``s = (T - j - 1) / T``.
The final decode ``p(x, h | z_0)`` is recorded in the payload but is never a trained column.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Callable

import torch
from torch import Tensor, nn

from elign.edm.diffusion import (
    N_POS,
    gaussian_log_prob,
    predict_clean,
    remove_com,
    reverse_step,
    sample_latent_noise,
    sample_step,
)
from elign.edm.egnn import EGNNDynamics
from elign.edm.losses import encode_latent, noise_prediction_loss
from elign.edm.persample import PerSampleTape
from elign.edm.schedule import PolynomialSchedule
from elign.engine.errors import ConfigError, check_int
from elign.engine.paths import resolve_package_path  # noqa: F401 - re-exported (elign.edm.cli, tests)
from elign.engine.rollout import Rollout, StepLogProbs

CHARGE_SCALE = 10.0  # the charge channel holds atomic number / 10 (upstream normalize_factors)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def extract_dynamics_state(obj: object) -> dict[str, Tensor]:
    """The dynamics' state dict from a loaded checkpoint object.

    Accepts a raw dynamics state dict, our trainer checkpoint (``{"model": state, ...}``; its EMA
    weights ``"ema"`` when it has them), and the
    upstream/ELIGN layouts (``model_state_dict``, ``module.``/``model.`` prefixes, a flow dict whose
    dynamics keys start with ``dynamics.`` next to ``buffer`` and ``gamma.gamma``).
    """
    if isinstance(obj, dict) and isinstance(obj.get("ema"), dict):
        obj = obj["ema"]  # a pretraining checkpoint: sample from the EMA weights, as EDM does
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    elif isinstance(obj, dict) and isinstance(obj.get("model_state_dict"), dict):
        obj = obj["model_state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError("the file does not hold a state dict")
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    if any(k.startswith("model.dynamics.") for k in state):
        # ELIGN saves the wrapped flow twice (shared tensors); keep the inner copy.
        state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    if any(k.startswith("dynamics.") for k in state):
        state = {k.removeprefix("dynamics."): v for k, v in state.items() if k.startswith("dynamics.")}
    return state


class EDMPolicy:
    """Sampler and differentiable log-probabilities for EDM (implements the engine's ``Policy``).

    Args:
        dynamics: the noise-prediction network (trained; ``module``).
        schedule: the fixed noise schedule.
        num_steps: ``T``, reverse steps per trajectory; must divide ``schedule.steps`` (strided DDPM).
        share_initial_noise: all members of a group start from the same ``z_T``.
        skip_prefix: ``k`` in ``[0, T)``; with ``share_initial_noise`` one trajectory per group runs the
            first ``k`` steps and the members branch from its ``z`` after them. Those steps are not
            trained (``step_mask`` False). Must be 0 without ``share_initial_noise``.
        rollout_batch_size: molecules per sampling chunk (a multiple of the group size, so a chunk
            never splits a group); None samples the whole batch at once.
        record_z0_pred: store the clean-sample prediction of every step in payload ``z0_pred``.
        full_precision_steps: the last ``k`` reverse steps (and the decode) ignore the dynamics'
            ``compute_dtype``. The last step's std is so small that bfloat16 rounding of the mean
            becomes log-prob gradient noise, and that step carries most of the gradient norm: on
            the shipped model the bf16 policy gradient has cosine 0.88-0.92 to the float32 one with
            ``k = 0`` and 1.0000 with ``k = 1``.
        checkpoint: path of starting weights for ``dynamics`` (a dynamics state dict or a trainer
            checkpoint with key ``model``); None keeps the constructed weights.
    """

    def __init__(
        self,
        dynamics: EGNNDynamics,
        schedule: PolynomialSchedule,
        num_steps: int,
        share_initial_noise: bool = True,
        skip_prefix: int = 0,
        rollout_batch_size: int | None = None,
        record_z0_pred: bool = False,
        checkpoint: str | None = None,
        full_precision_steps: int = 1,
    ) -> None:
        steps = schedule.steps
        divisors = f"divisors of {steps}: {', '.join(map(str, _divisors(steps)))}"
        self.num_steps = check_int("num_steps", num_steps, 1, allowed=divisors)
        if steps % self.num_steps != 0:
            raise ConfigError("num_steps", num_steps, divisors)
        self.skip_prefix = check_int("skip_prefix", skip_prefix, 0, self.num_steps - 1,
                                     allowed=f"an integer in [0, num_steps - 1 = {self.num_steps - 1}]")
        if self.skip_prefix > 0 and not share_initial_noise:
            raise ConfigError("skip_prefix", skip_prefix, "0 unless share_initial_noise is true")
        # a multiple of the group size: checked again when the group size is known (rollout)
        self.rollout_batch_size = check_int("rollout_batch_size", rollout_batch_size, 1, allow_none=True,
                                            allowed="null or a positive multiple of the group size")
        self.full_precision_steps = check_int("full_precision_steps", full_precision_steps, 0, self.num_steps)
        self.share_initial_noise = bool(share_initial_noise)
        self.record_z0_pred = bool(record_z0_pred)
        self.module: nn.Module = dynamics
        self.schedule = schedule
        self.num_features = int(dynamics.in_node_nf)  # F: one-hot types then one charge channel
        if checkpoint is not None:
            self._load(str(checkpoint))
        # The KL anchor is the starting point of fine-tuning, so it is copied after loading.
        self.reference = copy.deepcopy(dynamics).eval().requires_grad_(False)
        self._forward: nn.Module = dynamics

    # ------------------------------------------------------------------ engine protocol

    def distribute(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """Route the differentiable forward of :meth:`log_prob` through ``wrap(module)``."""
        self._forward = wrap(self.module)

    def to(self, device: torch.device | str) -> "EDMPolicy":
        self.module.to(device)
        self.reference.to(device)
        self.schedule.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    def rollout(self, prompts: Tensor, group_size: int) -> Rollout:
        """Sample ``group_size`` molecules per prompt.

        Args:
            prompts: LongTensor ``[P]`` of atom counts.
            group_size: ``K``.
        Returns:
            A :class:`Rollout` with ``B = P * K`` samples, ``T = num_steps`` columns and payload
            ``latents [B, T+1, N, 9]`` (``z_T ... z_0``), ``node_mask [B, N]``, ``positions [B, N, 3]`` (Å),
            ``atom_types [B, N]`` (index into H, C, N, O, F), ``charges [B, N]`` (atomic numbers),
            ``logp_decode [B]`` and, if recorded, ``z0_pred [B, T, N, 9]``; ``N`` is the largest count.
        """
        return self._sample(prompts, group_size, tape=None)

    def rollout_with_grads(self, prompts: Tensor, group_size: int) -> tuple[Rollout, PerSampleTape]:
        """:meth:`rollout`, backpropagating each trained step's log-prob as it is sampled.

        Returns the rollout and a :class:`PerSampleTape` holding, per sample, the sum over the
        trained steps of ``d log p / d theta`` (``B x`` the parameters in memory). The samples are
        those of :meth:`rollout` with the same RNG state, up to float rounding (the sampler's no-grad
        kernels are not used)."""
        counts = torch.as_tensor(prompts).reshape(-1)
        tape = PerSampleTape(self.module, counts.numel() * int(group_size))
        return self._sample(prompts, group_size, tape=tape), tape

    @torch.no_grad()
    def _sample(self, prompts: Tensor, group_size: int, tape: PerSampleTape | None) -> Rollout:
        k = int(group_size)
        if k < 1:
            raise ConfigError("group_size", group_size, "a positive integer")
        chunk = self.rollout_batch_size
        if chunk is not None and chunk % k != 0:
            raise ConfigError("rollout_batch_size", chunk, f"a positive multiple of the group size K={k}")
        counts = torch.as_tensor(prompts, dtype=torch.long).reshape(-1).to(self.device)
        if counts.numel() == 0 or int(counts.min()) < 1:
            raise ValueError(f"prompts must be positive node counts, got {counts.tolist()}")
        n_max = int(counts.max())
        groups_per_chunk = counts.numel() if chunk is None else chunk // k
        was_training = self.module.training
        self.module.eval()
        try:
            parts = [
                self._sample_groups(counts[g : g + groups_per_chunk], k, n_max, tape, first_sample=g * k)
                for g in range(0, counts.numel(), groups_per_chunk)
            ]
        finally:
            self.module.train(was_training)
        payload = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
        logp = payload.pop("logp")
        b, t = logp.shape
        step_mask = torch.ones(b, t, dtype=torch.bool, device=logp.device)
        step_mask[:, : self.skip_prefix] = False
        return Rollout(
            group_ids=torch.arange(counts.numel(), device=logp.device).repeat_interleave(k),
            logp_old=logp,
            step_mask=step_mask,
            payload=payload,
            info={
                "step_times": self._times(torch.arange(t, device=logp.device))[0],
                "metrics": {"rollout/mean_atoms": float(counts.double().mean())},
            },
        )

    def log_prob(self, rollout: Rollout, steps: Tensor, with_reference: bool) -> StepLogProbs:
        """Log-probs ``[b, t]`` of the recorded transitions at columns ``steps`` (``[t]`` long), with
        gradients, in one network call over ``b * t`` molecules. With ``with_reference``, also the
        frozen reference's means and log-probs (no grad), and the shared step std: what the
        closed-form Gaussian KL and the k3 estimator need."""
        latents = rollout.payload["latents"]
        mask = rollout.payload["node_mask"].bool()
        b, frames, n, c = latents.shape
        if frames != self.num_steps + 1:
            raise ValueError(f"rollout has {frames - 1} steps, the policy {self.num_steps}")
        steps = steps.to(latents.device).long().reshape(-1)
        t = steps.numel()
        mask_f = mask.unsqueeze(1).expand(b, t, n).reshape(b * t, n)
        # Re-centring makes the ratios exactly invariant to a global translation of stored latents.
        z_t = self._recentre(latents[:, steps].reshape(b * t, n, c), mask_f)
        z_s = self._recentre(latents[:, steps + 1].reshape(b * t, n, c), mask_f)
        time_t, time_s = (x.unsqueeze(0).expand(b, t).reshape(-1) for x in self._times(steps))
        gamma_t, gamma_s = self.schedule.gamma(time_t), self.schedule.gamma(time_s)
        full = self._full_precision(steps.unsqueeze(0).expand(b, t).reshape(-1))
        eps = self._forward(z_t, time_t.to(z_t.dtype), mask_f, full)
        mean, sigma = reverse_step(z_t, eps, gamma_t, gamma_s)
        logp = gaussian_log_prob(z_s, mean, sigma, mask_f).view(b, t)
        if not with_reference:
            return StepLogProbs(logp=logp)
        with torch.no_grad():
            eps_ref = self.reference(z_t, time_t.to(z_t.dtype), mask_f, full)
            mean_ref, _ = reverse_step(z_t, eps_ref, gamma_t, gamma_s)
            ref_logp = gaussian_log_prob(z_s, mean_ref, sigma, mask_f).view(b, t)
        std = torch.as_tensor(sigma, dtype=mean.dtype, device=mean.device).expand(b * t).reshape(b, t)
        return StepLogProbs(logp=logp, ref_logp=ref_logp, mean=mean.view(b, t, n, c),
                            ref_mean=mean_ref.view(b, t, n, c), std=std,
                            event_mask=mask_f.view(b, t, n, 1).to(mean.dtype))

    def supervised_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """EDM's noise-prediction loss on a data batch (pretraining), through the same forward
        path as ``log_prob`` (so DDP synchronises it).

        Args:
            batch: ``positions [B, N, 3]`` Å, ``one_hot [B, N, 5]``, ``charges [B, N, 1]`` atomic
                numbers, ``node_mask [B, N]`` (``elign.data.dataset.collate_qm9``).
        """
        device = self.device
        mask = batch["node_mask"].to(device).bool()
        x0 = encode_latent(batch["positions"].to(device, self.dtype), batch["one_hot"].to(device),
                           batch["charges"].to(device).reshape(mask.shape), mask)
        loss = noise_prediction_loss(self._forward, self.schedule, x0, mask)
        return loss, {"atoms_per_molecule": float(mask.sum(1).double().mean()), "num_samples": float(mask.shape[0])}

    # ------------------------------------------------------------------ sampling internals

    def _times(self, columns: Tensor) -> tuple[Tensor, Tensor]:
        """Continuous ``(t, s)`` ``[len(columns)]`` (float64) of trajectory columns ``j``."""
        s_index = (self.num_steps - 1 - columns).to(torch.float64)
        return (s_index + 1.0) / self.num_steps, s_index / self.num_steps

    def _full_precision(self, columns: Tensor | int) -> Tensor | bool:
        """Which trajectory columns (``[n]`` or one) run in full precision: the last ``k``."""
        return columns >= self.num_steps - self.full_precision_steps

    @staticmethod
    def _recentre(z: Tensor, mask: Tensor) -> Tensor:
        return torch.cat([remove_com(z[..., :N_POS], mask), z[..., N_POS:]], dim=-1)

    def _run(
        self, z: Tensor, mask: Tensor, first: int, last: int, tape: PerSampleTape | None = None, first_sample: int = 0
    ) -> dict[str, Tensor]:
        """Reverse steps for columns ``first .. last - 1`` from ``z`` ``[M, N, C]``; with a ``tape``,
        each step's log-prob is backpropagated into it (the molecules being samples ``first_sample``...).

        Returns ``latents [M, last - first + 1, N, C]`` (starting with ``z``), ``logp [M, last - first]``
        and, if recorded, ``z0_pred [M, last - first, N, C]``.
        """
        m = z.shape[0]
        frames, logps, preds = [z], [], []
        for j in range(first, last):
            t_cont, s_cont = self._times(torch.tensor([j], device=z.device))
            time_t, time_s = t_cont.expand(m), s_cont.expand(m)
            gamma_t, gamma_s = self.schedule.gamma(time_t), self.schedule.gamma(time_s)
            with contextlib.ExitStack() as recording:
                if tape is not None:
                    recording.enter_context(torch.enable_grad())
                    recording.enter_context(tape.record(first_sample))
                eps = self.module(z, time_t.to(z.dtype), mask, self._full_precision(j))
                mean, sigma = reverse_step(z, eps, gamma_t, gamma_s)
                z_next = sample_step(mean.detach(), sigma, mask)
                logp = gaussian_log_prob(z_next, mean, sigma, mask)
                if tape is not None:
                    logp.sum().backward()  # samples do not interact: the tape splits it per molecule
            if self.record_z0_pred:
                preds.append(predict_clean(z, eps.detach(), gamma_t))
            z = z_next
            logps.append(logp.detach())
            frames.append(z)
        out = {"latents": torch.stack(frames, dim=1), "logp": z.new_zeros(m, 0)}
        if logps:
            out["logp"] = torch.stack(logps, dim=1)
        if self.record_z0_pred:
            c = z.shape[-1]
            out["z0_pred"] = torch.stack(preds, dim=1) if preds else z.new_zeros(m, 0, z.shape[1], c)
        return out

    def _sample_groups(
        self, counts: Tensor, k: int, n_max: int, tape: PerSampleTape | None, first_sample: int
    ) -> dict[str, Tensor]:
        """Whole trajectories for ``len(counts)`` groups of ``k`` molecules, padded to ``n_max`` atoms;
        the trained (unshared) steps feed ``tape`` if given, as samples ``first_sample``..."""
        c = N_POS + self.num_features
        mask_p = torch.arange(n_max, device=counts.device).unsqueeze(0) < counts.unsqueeze(1)  # [p, N]
        mask = mask_p.repeat_interleave(k, dim=0)  # [p*k, N]
        if self.share_initial_noise:
            z_ref = sample_latent_noise((counts.numel(), n_max, c), mask_p, dtype=self.dtype)
            prefix = self._run(z_ref, mask_p, 0, self.skip_prefix)
            # Members copy the reference prefix (latents, log-probs, predictions) and branch after it.
            prefix = {key: v.repeat_interleave(k, dim=0) for key, v in prefix.items()}
            z = prefix["latents"][:, -1]
        else:
            prefix = None
            z = sample_latent_noise((mask.shape[0], n_max, c), mask, dtype=self.dtype)
        out = self._run(z, mask, self.skip_prefix, self.num_steps, tape, first_sample)
        if prefix is not None:
            out["latents"] = torch.cat([prefix["latents"][:, :-1], out["latents"]], dim=1)
            out["logp"] = torch.cat([prefix["logp"], out["logp"]], dim=1)
            if self.record_z0_pred:
                out["z0_pred"] = torch.cat([prefix["z0_pred"], out["z0_pred"]], dim=1)
        out.update(self._decode(out["latents"][:, -1], mask))
        out["node_mask"] = mask
        return out

    def _decode(self, z0: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """``p(x, h | z_0)``: positions sampled around the network's clean prediction with std
        ``sigma_0 / alpha_0 = exp(gamma_0 / 2)``; types and charges read off ``z_0`` itself (upstream)."""
        m = z0.shape[0]
        time0 = torch.zeros(m, dtype=torch.float64, device=z0.device)
        gamma0 = self.schedule.gamma(time0)
        eps = self.module(z0, time0.to(z0.dtype), mask, self.full_precision_steps > 0)
        mean = predict_clean(z0, eps, gamma0)
        sigma = torch.exp(0.5 * gamma0.double()).to(z0.dtype)
        xh = sample_step(mean, sigma, mask)
        n_types = self.num_features - 1
        types = z0[..., N_POS : N_POS + n_types].argmax(dim=-1)
        charges = torch.round(z0[..., N_POS + n_types] * CHARGE_SCALE).long()
        return {
            "positions": xh[..., :N_POS],
            "atom_types": torch.where(mask, types, torch.zeros_like(types)),
            "charges": torch.where(mask, charges, torch.zeros_like(charges)),
            "logp_decode": gaussian_log_prob(xh, mean, sigma, mask),
        }

    def _load(self, path: str) -> None:
        path = resolve_package_path(path)
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise ConfigError("checkpoint", path, "null or an existing weights file") from None
        except Exception as err:  # noqa: BLE001 - empty, truncated, random bytes, pickled objects: all unreadable
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise ConfigError("checkpoint", path, f"null or a readable weights file (cannot load {path}: {first})") from None
        try:
            self.module.load_state_dict(extract_dynamics_state(obj), strict=True)
        except (ValueError, RuntimeError) as err:
            first = str(err).strip().splitlines()[0]
            raise ConfigError("checkpoint", path, f"weights of this dynamics architecture ({first})") from err
