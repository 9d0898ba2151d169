"""Backends: the official Boltz2 at configured dimensions, and checkpoints loaded only when trusted."""

import pytest
import torch

from boltz_ft.backend import build_boltz2, load_boltz2
from elign.engine.errors import ConfigError

from conftest import tiny_backend_arguments


def test_build_is_the_official_class_and_seeded():
    from boltz.model.models.boltz2 import Boltz2

    a, b = build_boltz2(**tiny_backend_arguments(seed=3)), build_boltz2(**tiny_backend_arguments(seed=3))
    assert isinstance(a, Boltz2) and a.validate_structure is False and a.use_kernels is False
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    c = build_boltz2(**tiny_backend_arguments(seed=4))
    assert not torch.equal(a.s_init.weight, c.s_init.weight)
    # boltz reads training_args both as attributes and with .get: it must be a DictConfig.
    assert a.training_args.get("recycling_steps") == a.training_args.recycling_steps == 0


def test_configuration_errors_name_the_key():
    args = tiny_backend_arguments()
    args["confidence_model_args"].pop("confidence_args")
    with pytest.raises(ConfigError, match="confidence_model_args"):
        build_boltz2(**args)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="use_kernels"):
            build_boltz2(**{**tiny_backend_arguments(), "use_kernels": True})


def _lightning_checkpoint(model, path):
    """A checkpoint laid out as Lightning writes boltz2_conf.ckpt: pickled hyper-parameters (DictConfigs)."""
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                "pytorch-lightning_version": "2.5.0"}, path)


def test_an_untrusted_pickle_is_refused_and_a_trusted_one_loads(tmp_path):
    model = build_boltz2(**tiny_backend_arguments(seed=1))
    path = tmp_path / "boltz2_conf.ckpt"
    _lightning_checkpoint(model, path)
    with pytest.raises(ConfigError, match="trusted"):
        load_boltz2(path)
    loaded = load_boltz2(path, trusted=True)
    assert all(torch.equal(x, y) for x, y in zip(model.state_dict().values(), loaded.state_dict().values()))
    assert loaded.validate_structure is False
    # boltz predict overrides some hyper-parameters at load time; overrides reach the constructor.
    changed = load_boltz2(path, trusted=True, overrides={"diffusion_process_args": {
        **dict(model.hparams["diffusion_process_args"]), "step_scale": 1.2}})
    assert changed.structure_module.step_scale == pytest.approx(1.2)


def test_missing_file_and_foreign_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="no Boltz-2 checkpoint"):
        load_boltz2(tmp_path / "absent.ckpt")
    path = tmp_path / "weights.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(ConfigError, match="state_dict and hyper_parameters"):
        load_boltz2(path)
