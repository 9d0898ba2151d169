"""The config tree: every option of every (nested) group composes, every `_target_` imports, every
YAML key is a parameter of its target, every key has a comment, experiments are one domain each,
command-line group choices beat an experiment's, and the launchers compose."""

import functools
import inspect
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

import run as run_module
from elign.engine.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra")
CONTROL_KEYS = {"_target_", "_partial_", "_convert_", "_recursive_"}
TOP_LEVEL = set(OmegaConf.load(CONF / "config.yaml")) - {"defaults"}  # name, seed, device, ...


def options(group: str) -> list[str]:
    """Every option of a group, nested ones as ``edm/base``."""
    return sorted(p.relative_to(CONF / group).with_suffix("").as_posix() for p in (CONF / group).rglob("*.yaml"))


def compose_with(*overrides: str, hydra: bool = False) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra)


def target_nodes(node, path=""):
    """``(dotted path, node)`` of every node with a ``_target_``, nested ones included."""
    if isinstance(node, DictConfig):
        if "_target_" in node:
            yield path, node
        for key in node.keys():
            yield from target_nodes(node._get_node(key), f"{path}.{key}" if path else str(key))
    elif isinstance(node, ListConfig):
        for i, item in enumerate(node._iter_ex(resolve=False)):
            yield from target_nodes(item, f"{path}[{i}]")


def unbound_keys(node, where: str) -> list[str]:
    """Keys of ``_target_`` nodes that are not parameters of the target (unless it takes **kwargs)."""
    problems = []
    for path, target_node in target_nodes(node):
        target = get_object(target_node["_target_"])
        params = inspect.signature(target).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            continue
        for key in target_node.keys():
            if key not in CONTROL_KEYS and key not in params:
                problems.append(f"{where}: {path + '.' if path else ''}{key} is not a parameter of "
                                f"{target_node['_target_']} (it takes: {', '.join(params)})")
    return problems


def check_composed(cfg: DictConfig, where: str, complete: bool) -> None:
    """Interpolations resolve, targets import and bind; ``complete``: no ``???`` left either (an
    option may leave one for the user, such as a dataset path; a whole recipe may not)."""
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=complete)
    stray = set(cfg) - set(GROUPS) - TOP_LEVEL
    assert not stray, f"{where}: top-level keys that are neither a group nor in config.yaml: {sorted(stray)}"
    found = [n for _, n in target_nodes(cfg)]
    assert found, f"{where}: composed config has no _target_"
    for n in found:
        assert get_object(n["_target_"]) is not None, n["_target_"]
    assert not (problems := unbound_keys(cfg, where)), "\n".join(problems)


def recipe_of(group: str, option: str) -> list[str]:
    """The first experiment that picks ``group=option``, as an override.

    An option is composed inside a recipe that uses it: an experiment tunes its own strategy's keys
    (``strategy.channel_weights``), which another strategy (``supervised``) does not take. So a
    strategy no recipe uses is composed outside any recipe, with small neutral or EDM options in the
    domain slots; any other unused option goes into the default job."""
    used = [f"experiment={e}" for e, choices in experiment_choices().items() if choices.get(group) == option]
    if used:
        return used[:1]
    return ["~experiment", "model=edm/small", "reward=dummy", "dataloader=edm/qm9_nodes"] if group == "strategy" else []


@functools.lru_cache(maxsize=1)
def experiment_choices() -> dict[str, dict[str, str | None]]:
    return {e: dict(compose_with(f"experiment={e}", hydra=True).hydra.runtime.choices) for e in options("experiment")}


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_binds_to_its_targets(group, option):
    overrides = [f"{group}={option}"] if group == "experiment" else [*recipe_of(group, option), f"{group}={option}"]
    check_composed(compose_with(*overrides), f"conf/{group}/{option}.yaml (composed: {' '.join(overrides)})",
                   complete=group == "experiment")


def test_options_are_found_in_domain_folders():
    # The walk above must see nested options, or a domain's configs would go untested.
    assert {"edm/base", "edm/small", "edm/qm9"} <= set(options("model"))
    assert {"dummy", "edm/xtb"} <= set(options("reward"))
    assert "edm/fed_grpo" in options("experiment")


@pytest.mark.parametrize("path", sorted(p.relative_to(CONF).as_posix() for p in CONF.rglob("*.yaml")))
def test_every_key_of_every_file_is_a_parameter_of_its_target(path):
    # File by file, so the message names the file that holds the key.
    assert not (problems := unbound_keys(OmegaConf.load(CONF / path), f"conf/{path}")), "\n".join(problems)


def test_a_misspelled_key_is_reported_with_file_and_key(tmp_path):
    bad = OmegaConf.create({"trainer": {"optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True, "lrr": 1e-3}},
                            "reward": {"_target_": "elign.engine.rollout.ConstantReward", "values": {"x": 0.0}}})
    problems = unbound_keys(bad, "conf/experiment/x.yaml")
    assert len(problems) == 1 and problems[0].startswith("conf/experiment/x.yaml: trainer.optimizer.lrr is not a parameter")
    takes_kwargs = OmegaConf.create({"_target_": "logging.basicConfig", "anything": 1})  # basicConfig(**kwargs)
    assert unbound_keys(takes_kwargs, "f") == []


KEY_LINE = re.compile(r"^(\s*)([^\s#:-][^:#]*):(?:\s|$)")
WORDS = re.compile(r"[A-Za-z]{2,}")


def uncommented_keys(path: Path) -> list[tuple[int, str]]:
    """``(line number, line)`` of key lines without a real comment (two words or more). Exempt:
    Hydra's control keys, the defaults list, and in ``@package _global_`` files the top-level keys
    that name a config group (they only open that group's keys)."""
    text = path.read_text()
    global_package = text.startswith("# @package _global_")
    missing = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        m = KEY_LINE.match(line)
        if m is None:
            continue  # blank, comment or list item
        key, indent = m.group(2).strip(), m.group(1)
        if key in CONTROL_KEYS or key == "defaults" or (global_package and not indent and key in GROUPS):
            continue
        comment = line.split(" #", 1)[1] if " #" in line else ""
        if len(WORDS.findall(comment)) < 2:
            missing.append((lineno, line.strip()))
    return missing


def test_every_yaml_key_has_a_real_comment():
    missing = [f"{p.relative_to(ROOT)}:{n}: {line}" for p in sorted(CONF.rglob("*.yaml")) for n, line in uncommented_keys(p)]
    assert not missing, "keys without a comment of two words or more:\n" + "\n".join(missing)


def test_comment_check_rejects_a_bare_hash_and_one_word(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text("a: 1  #\nb: 2  # H\nc: 3  # two words\nd:\n  e: 4\n  f: 5  # nested key, said why\n"
                 "_target_: x.Y\ndefaults:\n  - model: a\n")
    assert [n for n, _ in uncommented_keys(f)] == [1, 2, 4, 5]
    g = tmp_path / "exp.yaml"
    g.write_text("# @package _global_\ntrainer:\n  max_iterations: 3\nname: x  # run name\n")
    assert [n for n, _ in uncommented_keys(g)] == [3]


# ---- domains and precedence --------------------------------------------------------------------

@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_sets_its_domain_groups_and_stays_in_its_domain(experiment):
    cfg = compose_with(f"experiment={experiment}", hydra=True)
    choices = dict(cfg.hydra.runtime.choices)
    run_module.check_domains(choices)
    domain = experiment.split("/")[0]
    for group in ("model", "dataloader"):  # the groups with no neutral option
        assert choices[group].startswith(f"{domain}/"), (group, choices[group])


def test_command_line_choices_beat_the_experiments():
    default = compose_with(hydra=True)
    assert default.hydra.runtime.choices.model == "edm/base_10k"
    cfg = compose_with("reward=dummy", "model=edm/small", hydra=True)
    assert cfg.hydra.runtime.choices.reward == "dummy" and cfg.hydra.runtime.choices.model == "edm/small"
    assert cfg.reward._target_ == "elign.engine.rollout.ConstantReward"
    assert cfg.model.dynamics.hidden_nf == OmegaConf.load(CONF / "model/edm/small.yaml").dynamics.hidden_nf
    assert cfg.filter._target_ == default.filter._target_  # the experiment's other choices stay
    # Also through an experiment that inherits the default one, and for its own override (evaluator).
    cfg = compose_with("experiment=edm/elign", "model=edm/small", hydra=True)
    assert cfg.hydra.runtime.choices.model == "edm/small" and cfg.hydra.runtime.choices.evaluator == "edm/sample"
    assert cfg.trainer.max_iterations == OmegaConf.load(CONF / "experiment/edm/elign.yaml").trainer.max_iterations


def test_the_default_job_is_the_elign_recipe_over_the_short_one():
    cfg = compose_with()
    recipe = OmegaConf.load(CONF / "experiment/edm/elign.yaml")
    short = OmegaConf.load(CONF / "experiment/edm/fed_grpo.yaml")
    assert cfg.name == recipe.name == "elign" and cfg.host_allocator == short.host_allocator == "retain"
    for key in ("trainer.max_iterations", "trainer.optimizer.lr", "dataloader.batch_size", "strategy.kl_coef"):
        assert OmegaConf.select(cfg, key) == OmegaConf.select(recipe, key), key
    assert cfg.model.checkpoint == OmegaConf.load(CONF / "model/edm/base_10k.yaml").checkpoint
    # What the ELIGN recipe does not set comes from the short recipe it builds on.
    for key in ("trainer.step_chunk_size", "trainer.lr_schedule.warmup_steps", "strategy.channel_weights",
                "strategy.clip_range"):
        assert OmegaConf.select(recipe, key) is None and OmegaConf.select(cfg, key) == OmegaConf.select(short, key), key


def test_shared_groups_are_neutral_without_an_experiment():
    cfg = compose_with("~experiment", "model=edm/small", "reward=dummy", "dataloader=edm/qm9_nodes")
    assert cfg.host_allocator == "default"
    assert cfg.strategy.channel_weights == {}
    missing = {k for k in ("trainer.max_iterations", "trainer.micro_batch_size", "trainer.optimizer.lr")
               if OmegaConf.is_missing(OmegaConf.select(cfg, k.rsplit(".", 1)[0]), k.rsplit(".", 1)[1])}
    assert missing == {"trainer.max_iterations", "trainer.micro_batch_size", "trainer.optimizer.lr"}


@pytest.mark.parametrize("choices,group,domains", [
    ({"experiment": "edm/fed_grpo", "model": "edm/base", "reward": "molgen/ume_pll"}, "reward", ("edm", "molgen")),
    ({"experiment": "boltz/grpo", "model": "edm/base", "reward": "boltz/lddt"}, "model", ("boltz", "edm")),
    # No experiment: the domain most groups pick is the reference.
    ({"model": "boltz/tiny", "dataloader": "edm/qm9", "reward": "edm/xtb", "evaluator": None}, "model", ("edm", "boltz")),
])
def test_check_domains_names_the_group_and_both_domains(choices, group, domains):
    with pytest.raises(ConfigError) as info:
        run_module.check_domains(choices)
    assert info.value.key == group and info.value.value == choices[group]
    assert all(f"'{d}'" in str(info.value) for d in domains)


def test_check_domains_accepts_neutral_options_and_ignores_hydras_groups():
    run_module.check_domains({"experiment": "edm/fed_grpo", "model": "edm/base", "reward": "dummy", "filter": "none",
                              "evaluator": None, "strategy": "fed_grpo", "hydra/launcher": "x/joblib", "hydra": "a/b"})


# ---- launchers ---------------------------------------------------------------------------------

def test_submitit_slurm_launcher_composes_with_its_keys():
    cfg = compose_with("hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=240",
                       "hydra.launcher.gpus_per_node=1", "hydra.launcher.cpus_per_task=8", "hydra.launcher.mem_gb=64",
                       hydra=True)
    launcher = cfg.hydra.launcher
    assert get_object(launcher._target_).__name__ == "SlurmLauncher"
    assert (launcher.partition, launcher.timeout_min, launcher.gpus_per_node) == ("gpu", 240, 1)
    assert launcher.submitit_folder.startswith(cfg.hydra.sweep.dir)  # the sweep dir resolves through ${name}
