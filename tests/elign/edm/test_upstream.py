"""Upstream EDM checkpoint import: a folder written in the upstream format round-trips into our model;
unsafe pickles, mismatched weights and unsupported schedules are refused with readable errors."""

from __future__ import annotations

import argparse
import os
import pickle
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from elign.edm.egnn import EGNNDynamics
from elign.edm.policy import EDMPolicy
from elign.edm.schedule import PolynomialSchedule
from elign.edm.upstream import ForbiddenGlobalError, load_upstream_edm, main, read_args
from elign.engine.errors import ConfigError, DataFormatError

NF, LAYERS = 32, 2  # the QM9 run has nf 256, n_layers 9; small keeps the test fast

# The 53 fields of the upstream edm_qm9/args.pickle in their order (spec §3), nf/n_layers made small.
UPSTREAM_FIELDS: list[tuple[str, object]] = [
    ("exp_name", "polynomial_2_final_0"), ("model", "egnn_dynamics"), ("probabilistic_model", "diffusion"),
    ("diffusion_steps", 1000), ("diffusion_noise_schedule", "polynomial_2"), ("diffusion_noise_precision", 1e-05),
    ("diffusion_loss_type", "l2"), ("n_epochs", 3000), ("batch_size", 64), ("lr", 0.0001), ("brute_force", False),
    ("actnorm", True), ("break_train_epoch", False), ("dp", True), ("condition_time", True), ("clip_grad", True),
    ("trace", "hutch"), ("n_layers", LAYERS), ("inv_sublayers", 1), ("nf", NF), ("tanh", True), ("attention", True),
    ("norm_constant", 1), ("sin_embedding", False), ("ode_regularization", 0.001), ("dataset", "qm9"),
    ("datadir", "qm9/temp"), ("filter_n_atoms", None), ("dequantization", "argmax_variational"),
    ("n_report_steps", 1), ("wandb_usr", None), ("no_wandb", False), ("online", True), ("no_cuda", False),
    ("save_model", True), ("generate_epochs", 1), ("num_workers", 0), ("test_epochs", 20),
    ("data_augmentation", False), ("conditioning", []), ("resume", None), ("start_epoch", 0), ("ema_decay", 0.9999),
    ("augment_noise", 0), ("n_stability_samples", 1000), ("normalize_factors", [1, 4, 10]), ("remove_h", False),
    ("include_charges", True), ("visualize_every_batch", 100000000.0), ("normalization_factor", 1),
    ("cuda", True), ("context_node_nf", 0), ("current_epoch", 1001),
]


def _model(seed: int) -> EGNNDynamics:
    torch.manual_seed(seed)
    dyn = EGNNDynamics(in_node_nf=6, hidden_nf=NF, num_layers=LAYERS, inv_sublayers=1)
    with torch.no_grad():  # make the coordinate head matter, so a wrong load cannot hide behind gain 1e-3
        for i in range(LAYERS):
            dyn.egnn._modules[f"e_block_{i}"].gcl_equiv.coord_mlp[4].weight.normal_(0, 0.3)
    return dyn


def _flow_state(dyn: EGNNDynamics, power: float = 2.0) -> OrderedDict:
    """The EnVariationalDiffusion state dict upstream would save: buffer, gamma.gamma, dynamics.egnn.*."""
    state = OrderedDict([("buffer", torch.zeros(1)), ("gamma.gamma", PolynomialSchedule(1000, power, 1e-5).table)])
    state.update((f"dynamics.{k}", v.clone()) for k, v in dyn.state_dict().items())
    return state


def _write_folder(folder: Path, state: OrderedDict, name: str = "generative_model_ema.npy", **overrides) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    fields = dict(UPSTREAM_FIELDS)
    fields.update(overrides)
    with open(folder / "args.pickle", "wb") as handle:
        pickle.dump(argparse.Namespace(**fields), handle, protocol=4)
    torch.save(state, folder / name)
    return folder


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    node_mask = torch.tensor([[True] * 6 + [False] * 2, [True] * 8])
    z = torch.randn(2, 8, 9, generator=gen) * node_mask[..., None]
    return z, torch.tensor([0.3, 0.9]), node_mask


def test_args_fixture_has_the_53_upstream_fields() -> None:
    assert len(UPSTREAM_FIELDS) == 53 and len(dict(UPSTREAM_FIELDS)) == 53


def test_loads_and_forward_matches_the_written_model(tmp_path: Path) -> None:
    source = _model(seed=1)
    state = _flow_state(source)
    assert list(state)[:4] == ["buffer", "gamma.gamma", "dynamics.egnn.embedding.weight",
                               "dynamics.egnn.embedding.bias"]
    assert len(state) == 2 + 4 + LAYERS * 15  # spec §2 count rule
    folder = _write_folder(tmp_path / "edm_qm9", state)
    torch.manual_seed(99)  # our constructor's random init must be overwritten
    dyn, schedule, info = load_upstream_edm(folder)
    assert info["ema"] is True and info["weights_path"].endswith("generative_model_ema.npy")
    assert info["gamma_max_abs_diff"] <= 1e-6 and info["args"]["current_epoch"] == 1001
    assert schedule.steps == 1000 and schedule.power == 2.0
    assert dyn.egnn.embedding.weight.shape == (NF, 7)
    z, t, mask = _inputs()
    with torch.no_grad():
        assert torch.equal(dyn(z, t, mask), source(z, t, mask))
    # An explicit weights file, with args.pickle found next to it.
    dyn2, _, info2 = load_upstream_edm(folder / "generative_model_ema.npy")
    assert info2["ema"] is None
    assert all(torch.equal(a, b) for a, b in zip(dyn2.state_dict().values(), source.state_dict().values()))


def test_cli_converts_to_a_state_dict_edmpolicy_accepts(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    source = _model(seed=2)
    folder = _write_folder(tmp_path / "ckpt", _flow_state(source))
    out = tmp_path / "out" / "dynamics.pth"
    assert main([str(folder), str(out)]) == 0
    assert '"hidden_nf": 32' in capsys.readouterr().out
    policy = EDMPolicy(EGNNDynamics(in_node_nf=6, hidden_nf=NF, num_layers=LAYERS), PolynomialSchedule(),
                       num_steps=10, checkpoint=str(out))
    for key, value in source.state_dict().items():
        assert torch.equal(policy.module.state_dict()[key], value), key


def test_forbidden_global_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    folder = _write_folder(tmp_path / "evil", _flow_state(_model(seed=3)))
    marker = tmp_path / "pwned"
    # Protocol-0 pickle calling os.system (what a __reduce__ exploit produces).
    (folder / "args.pickle").write_bytes(f"cos\nsystem\n(S'touch {marker}'\ntR.".encode())
    with pytest.raises(ForbiddenGlobalError) as err:
        load_upstream_edm(folder)
    assert "os.system" in str(err.value) and str(folder / "args.pickle") in str(err.value)
    assert not marker.exists()

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (folder / "args.pickle").write_bytes(pickle.dumps(Exploit(), protocol=4))
    with pytest.raises(ForbiddenGlobalError, match="system"):
        read_args(folder / "args.pickle")
    # A forbidden global nested inside an otherwise valid Namespace.
    (folder / "args.pickle").write_bytes(pickle.dumps(argparse.Namespace(x=OrderedDict()), protocol=4))
    with pytest.raises(ForbiddenGlobalError, match="collections.OrderedDict"):
        read_args(folder / "args.pickle")
    assert not marker.exists()


def test_missing_key_and_wrong_shape_are_readable(tmp_path: Path) -> None:
    state = _flow_state(_model(seed=4))
    del state["dynamics.egnn.e_block_1.gcl_0.att_mlp.0.bias"]
    with pytest.raises(DataFormatError, match=r"missing keys: dynamics\.egnn\.e_block_1\.gcl_0\.att_mlp\.0\.bias"):
        load_upstream_edm(_write_folder(tmp_path / "missing", state))

    state = _flow_state(_model(seed=4))
    state["dynamics.egnn.embedding.weight"] = torch.zeros(NF, 8)
    with pytest.raises(DataFormatError) as err:
        load_upstream_edm(_write_folder(tmp_path / "shape", state))
    assert "dynamics.egnn.embedding.weight: file (32, 8), model (32, 7)" in str(err.value)
    assert "generative_model_ema.npy" in str(err.value)

    # The model in args.pickle is larger than the weights: the hint names the architecture.
    with pytest.raises(DataFormatError, match="n_layers=3"):
        load_upstream_edm(_write_folder(tmp_path / "layers", _flow_state(_model(seed=4)), n_layers=3))


def test_gamma_table_mismatch_is_reported(tmp_path: Path) -> None:
    folder = _write_folder(tmp_path / "gamma", _flow_state(_model(seed=5), power=3.0))
    with pytest.raises(DataFormatError, match=r"gamma\.gamma does not match the polynomial_2 table"):
        load_upstream_edm(folder)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"diffusion_noise_schedule": "learned"}, "learned"),
        ({"diffusion_noise_schedule": "cosine"}, "cosine"),
        ({"sin_embedding": True}, "sin_embedding"),
        ({"normalize_factors": [1, 4, 1]}, "normalize_factors"),
        ({"aggregation_method": "mean"}, "aggregation_method"),
        ({"conditioning": ["alpha"], "context_node_nf": 1}, "conditioning"),
        ({"model": "gnn_dynamics"}, "model"),
    ],
)
def test_unsupported_args_are_clear(tmp_path: Path, overrides: dict, match: str) -> None:
    folder = _write_folder(tmp_path / "args", _flow_state(_model(seed=6)), **overrides)
    with pytest.raises(ConfigError, match=match) as err:
        load_upstream_edm(folder)
    assert "args.pickle" in str(err.value)


def test_ema_decay_zero_picks_the_raw_weights(tmp_path: Path) -> None:
    ema, raw = _model(seed=7), _model(seed=8)
    folder = _write_folder(tmp_path / "raw", _flow_state(ema), ema_decay=0)
    torch.save(_flow_state(raw), folder / "generative_model.npy")
    dyn, _, info = load_upstream_edm(folder)
    assert info["ema"] is False and info["weights_path"].endswith("generative_model.npy")
    assert torch.equal(dyn.egnn.embedding.weight, raw.egnn.embedding.weight)

    (folder / "generative_model.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"generative_model\.npy not found .*ema_decay=0"):
        load_upstream_edm(folder)


def test_elign_doubled_trainer_checkpoint_loads(tmp_path: Path) -> None:
    source = _model(seed=9)
    state = _flow_state(source)
    doubled = OrderedDict(state)
    doubled.update((f"model.{k}", v) for k, v in state.items())  # ELIGN's 282-key EDMModel layout
    folder = _write_folder(tmp_path / "elign", state)
    torch.save({"epoch": 3, "model_state_dict": {f"module.{k}": v for k, v in doubled.items()}},
               folder / "checkpoint_best.pth")
    dyn, _, _ = load_upstream_edm(folder / "checkpoint_best.pth")
    assert torch.equal(dyn.egnn.embedding.weight, source.egnn.embedding.weight)
