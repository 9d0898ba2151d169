"""GRPO over Boltz-2's own sampler: prompts are structure targets, actions the sampler's noisy states.

``BoltzSamplerPolicy`` runs the trunk and the diffusion conditioning once per target, samples the G members
of a group on the multiplicity axis (:mod:`boltz_ft.sampler`, boltz's sampler bit for bit), and scores the
recorded actions with exact Gaussian log-probs. The reference policy of the KL is the same model with the
LoRA scale at 0 (no copy). When no trainable weight sits in the trunk, the rollout's trunk is reused by the
update (one trunk pass per target and iteration); otherwise the update recomputes it with gradients.

Rollout layout (what :class:`boltz_ft.reward.StructureReward` reads): ``group_payload["feat/<key>"]``
``[P, ...]`` each target's features; ``payload["coords"]`` ``[B, M, 3]`` the sampled structures;
``payload["noisy"]`` ``[B, N, M, 3]``, ``payload["rotations"]`` ``[B, N, 3, 3]``,
``payload["translations"]`` ``[B, N, 1, 3]``; ``logp_old`` ``[B, N - 1]`` (actions x̃_1 .. x̃_{N-1}).
"""

from __future__ import annotations

import time
from typing import Any, Mapping

import torch
from torch import Tensor

from elign.engine.errors import ConfigError, check_int
from elign.engine.rollout import Rollout, StepLogProbs
from boltz_ft import lora as lora_lib
from boltz_ft.data import stack_batches
from boltz_ft.dataset import StructureBatches
from boltz_ft.policy import BoltzPolicy, merge_features
from boltz_ft.sampler import gaussian_log_prob, sample_trajectory, sampler_schedule, step_mean, step_update

__all__ = ["BoltzSamplerPolicy", "StructurePrompts"]

TRUNK_PREFIX = "structure_module."
"""Trainable weights outside this prefix make the trunk trainable (the update then recomputes it)."""


class StructurePrompts(StructureBatches):
    """GRPO prompts: ``batch_size // group_size`` cropped targets per iteration (a list of batches).

    Args:
        group_size: samples per target (G).
        batch_size: samples per iteration and rank (a multiple of ``group_size``).
        **kwargs: as :class:`boltz_ft.dataset.StructureBatches` (paths, ids, max_tokens, ...).
    """

    def __init__(self, group_size: int, batch_size: int, **kwargs: Any) -> None:
        super().__init__(batch_size=1, **kwargs)
        self.group_size = check_int("group_size", group_size, 1)
        self.batch_size = check_int("batch_size", batch_size, self.group_size)
        if self.batch_size % self.group_size:
            raise ConfigError("dataloader.batch_size", batch_size, f"a multiple of group_size={group_size}")
        if self.max_tokens is None:
            raise ConfigError("dataloader.max_tokens", None, "an integer (the targets of an iteration must stack)")

    def __next__(self) -> list[dict[str, Any]]:
        prompts = []
        for _ in range(self.batch_size // self.group_size):
            prompts.append(self.item(self.draws * self.world_size + self.rank))
            self.draws += 1
        return prompts


class BoltzSamplerPolicy(BoltzPolicy):
    """:class:`boltz_ft.policy.BoltzPolicy` plus the sampler as a Gaussian policy (module docstring).

    Args:
        sampling_steps: sampler steps N (boltz predict: 200; the actions are the stochastic ones).
        rollout_recycling_steps: trunk recycling passes of the rollout (and of a recomputed trunk).
        max_action_noise_angstrom: train only the stochastic actions x̃_k whose noise level t̂_k is at most this
            (Å); null = all of them. The early, high-noise actions of a small model are forgotten by the end of
            the trajectory (``bench/boltz_grpo_credit.py`` measures it): their log-prob gradients carry no reward
            signal, only variance, and each costs a denoiser call per sample in the update.
        shared_prefix: the G samples of a group share one trajectory up to the first trained action and branch
            there (the prefix costs one denoiser row instead of G); its untrained actions would cancel in the
            group-normalised loss anyway.
        **kwargs: as :class:`boltz_ft.policy.BoltzPolicy` (backend, lora, sft, checkpoint, seed).
    """

    def __init__(self, sampling_steps: int = 20, rollout_recycling_steps: int = 0,
                 max_action_noise_angstrom: float | None = None, shared_prefix: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sampling_steps = check_int("sampling_steps", sampling_steps, 2)
        self.rollout_recycling_steps = check_int("rollout_recycling_steps", rollout_recycling_steps, 0)
        self.schedule = sampler_schedule(self.model.structure_module, self.sampling_steps)
        self.trained_actions = self.schedule.trained.clone()  # [N - 1] actions x̃_1 .. x̃_{N-1} in the loss
        if max_action_noise_angstrom is not None:
            limit = float(max_action_noise_angstrom)
            self.trained_actions &= self.schedule.t_hat[1:] <= limit
            if limit <= 0 or not bool(self.trained_actions.any()):
                levels = ", ".join(f"{float(t):.3g}" for t in self.schedule.t_hat[1:][self.schedule.trained])
                raise ConfigError("max_action_noise_angstrom", max_action_noise_angstrom,
                                  f"null or a level (Å) at or above one stochastic action's t̂ ({levels})")
        # Action x̃_k is drawn at sampler step k (column k - 1): the group branches at the first trained one.
        self.shared_steps = int(self.trained_actions.nonzero()[0]) + 1 if shared_prefix else 0
        self._trunks: dict[int, Any] = {}
        self._next_uid = 0

    @property
    def trunk_trainable(self) -> bool:
        prefix = "model." + TRUNK_PREFIX
        return any(not name.startswith(prefix) for name, _ in self.trainable_parameters())

    def describe(self, prompts: list[dict[str, Any]] | dict[str, Any]) -> dict[str, Any]:
        """The dry run's view: the first prompt's shapes and losses (:meth:`BoltzPolicy.describe`) and the
        sampler policy's action count."""
        out = super().describe(prompts[0] if isinstance(prompts, list) else prompts)
        out.update({"sampler/steps": self.sampling_steps,
                    "sampler/stochastic_actions": int(self.schedule.trained.sum()),
                    "sampler/trained_actions": int(self.trained_actions.sum()),
                    "sampler/trunk_trainable": str(self.trunk_trainable)})
        return out

    # ------------------------------------------------------------------ rollout

    def rollout(self, prompts: list[dict[str, Any]], group_size: int) -> Rollout:
        """G samples of each prompt's target; the trunk runs once per target."""
        core = self.module.core
        trajectories, uids, times = [], [], {"trunk": 0.0, "sampling": 0.0}
        self._trunks = {}
        with self.evaluating():
            for batch in prompts:
                feats = merge_features(batch, self.device)
                start = time.perf_counter()
                trunk = core.trunk(feats, self.rollout_recycling_steps, grad=False)
                times["trunk"] += time.perf_counter() - start
                start = time.perf_counter()
                traj = sample_trajectory(lambda x, t: core.denoise(trunk, feats, x, t, x.shape[0]), self.schedule,
                                         feats["atom_pad_mask"][0], group_size, self.shared_steps)
                times["sampling"] += time.perf_counter() - start
                uid, self._next_uid = self._next_uid, self._next_uid + 1
                self._trunks[uid] = trunk
                trajectories.append(traj)
                uids.append(uid)
        stacked = stack_batches(prompts)
        group_payload = {f"feat/{k}": v for part in ("inputs", "targets") for k, v in stacked[part].items()}
        group_payload["uid"] = torch.tensor(uids)
        trained = self.trained_actions.to(self.device)
        b = len(prompts) * group_size
        payload = {"coords": torch.cat([t.coords for t in trajectories]),
                   "noisy": torch.cat([t.noisy for t in trajectories]),
                   "rotations": torch.cat([t.rotations for t in trajectories]),
                   "translations": torch.cat([t.translations for t in trajectories])}
        return Rollout(
            group_ids=torch.arange(len(prompts)).repeat_interleave(group_size),
            logp_old=torch.cat([t.logp for t in trajectories]).float(),
            step_mask=trained.unsqueeze(0).expand(b, -1).clone(),
            payload=payload, group_payload=group_payload,
            info={"target_ids": [p["meta"]["pdb_id"] for p in prompts],
                  "metrics": {"rollout/trunk_passes": float(len(prompts)), "timing/rollout_trunk": times["trunk"],
                              "timing/rollout_sampling": times["sampling"]}})

    # ------------------------------------------------------------------ log-probs

    def log_prob(self, rollout: Rollout, steps: Tensor, with_reference: bool) -> StepLogProbs:
        """Log-probs ``[b, t]`` of the actions x̃_{j+1} at columns ``steps`` (``[t]``), one denoiser call per
        target over its samples × steps; with ``with_reference`` also the LoRA-scale-0 means and the std."""
        steps = steps.to(self.device).long().reshape(-1)
        b, t = rollout.batch_size, steps.numel()
        noisy = rollout.payload["noisy"].to(self.device)
        m = noisy.shape[2]
        logp = torch.zeros(b, t, device=self.device)
        mean_all = torch.zeros(b, t, m, 3, device=self.device)
        ref_all = torch.zeros(b, t, m, 3, device=self.device) if with_reference else None
        trained = self.schedule.trained.to(self.device)[steps]  # [t]
        # Deterministic tail steps (variance 0) get variance 1 and a log-prob of 0: no 0/0 in the backward.
        var = torch.where(trained, self.schedule.var[1:].to(self.device)[steps].float(), torch.ones(()))  # [t]
        mask_all = rollout.group_payload["feat/atom_pad_mask"].to(self.device)
        for group in rollout.group_ids.unique().tolist():
            rows = (rollout.group_ids == group).nonzero().flatten().to(self.device)
            feats = {k.removeprefix("feat/"): v[group:group + 1].to(self.device)
                     for k, v in rollout.group_payload.items() if k.startswith("feat/")}
            uid = int(rollout.group_payload["uid"][group])
            trunk = None if self.trunk_trainable else self._trunk(uid, feats)
            means = self._means(rollout, rows, steps, feats, trunk, self._forward)
            mask = mask_all[group].unsqueeze(0).expand(rows.numel() * t, m)
            target = noisy[rows][:, steps + 1].reshape(-1, m, 3)
            logp[rows] = gaussian_log_prob(target, means, var.repeat(rows.numel()), mask).view(-1, t) * trained
            mean_all[rows] = means.view(-1, t, m, 3)
            if with_reference:
                with torch.no_grad(), lora_lib.lora_scale(self.model, 0.0):
                    ref_trunk = trunk if trunk is not None and not self.trunk_trainable else None
                    ref_all[rows] = self._means(rollout, rows, steps, feats, ref_trunk, self.module).view(-1, t, m, 3)
        if not with_reference:
            return StepLogProbs(logp=logp)
        atom_mask = mask_all[rollout.group_ids.to(self.device)].view(b, 1, m, 1).expand(b, t, m, 1).float()
        ref_logp = torch.stack([gaussian_log_prob(noisy[:, j + 1], ref_all[:, i], var[i].expand(b),
                                                  atom_mask[:, i, :, 0]) for i, j in enumerate(steps.tolist())], 1)
        ref_logp = ref_logp * trained
        return StepLogProbs(logp=logp, ref_logp=ref_logp, mean=mean_all, ref_mean=ref_all,
                            std=var.sqrt().unsqueeze(0).expand(b, t), event_mask=atom_mask)

    def _trunk(self, uid: int, feats: Mapping[str, Tensor]) -> Any:
        """The rollout's trunk of a target (frozen trunk), or a fresh no-grad one after a resume."""
        if uid not in self._trunks:
            with torch.no_grad():
                self._trunks[uid] = self.module.core.trunk(feats, self.rollout_recycling_steps, grad=False)
        return self._trunks[uid]

    def _means(self, rollout: Rollout, rows: Tensor, steps: Tensor, feats: Mapping[str, Tensor], trunk: Any,
               forward: Any) -> Tensor:
        """``[rows * t, M, 3]`` Gaussian means μ_{j+1} = R (x_{j+1} − mean) + τ from the recorded x̃_j."""
        noisy = rollout.payload["noisy"].to(self.device)[rows]  # [r, N, M, 3]
        r, t, m = rows.numel(), steps.numel(), noisy.shape[2]
        x_prev = noisy[:, steps].reshape(r * t, m, 3)
        t_hat = self.schedule.t_hat.to(self.device)[steps].float().repeat(r)
        sigma_next = self.schedule.sigma.to(self.device)[steps + 1].float().repeat(r)
        out = forward(feats, self.rollout_recycling_steps,
                      denoise={"x_noisy": x_prev, "sigma": t_hat, "multiplicity": r * t, "trunk": trunk})
        mask = feats["atom_pad_mask"].expand(r * t, m)
        x_next = step_update(x_prev, out["denoised"], t_hat, sigma_next, self.schedule.step_scale, mask,
                             self.schedule.align)
        rotation = rollout.payload["rotations"].to(self.device)[rows][:, steps + 1].reshape(r * t, 3, 3)
        translation = rollout.payload["translations"].to(self.device)[rows][:, steps + 1].reshape(r * t, 1, 3)
        return step_mean(x_next, rotation, translation)
