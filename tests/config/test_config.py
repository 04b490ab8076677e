"""Config loading: YAML + base inheritance + CLI overrides, type checking, error messages, save/load round trip."""
from __future__ import annotations  # the config dataclasses of rmcore use it too: annotations are strings

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from rmcore.config.loader import config_to_dict, load_config, parse_cli, parse_value, save_config
from rmcore.errors import ConfigError


@dataclass
class ModelSection:
    name: str = "tiny"
    dim: int = 64
    n_layers: int = 2
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    checkpoint: str | None = None
    dtype: Literal["float32", "bfloat16"] = "float32"


@dataclass
class OptimSection:
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    lr_milestones: list[float] = field(default_factory=lambda: [0.5, 0.9])
    no_decay: list[str] = field(default_factory=lambda: ["bias", "norm"])
    max_steps: int = 100


@dataclass
class LoraSection:
    r: int = 4
    alpha: float = 8.0


@dataclass
class RunConfig:
    seed: int = 0
    out_dir: str = "runs/default"
    model: ModelSection = field(default_factory=ModelSection)
    optim: OptimSection = field(default_factory=lambda: OptimSection(lr=1e-4))  # not the section's own default
    lora: LoraSection | None = None


@dataclass
class NeedsData:
    data_path: str
    seed: int = 0


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# ---------------------------------------------------------------------------------------------------------------
# loading


def test_defaults_without_file_or_overrides():
    cfg = load_config(RunConfig, None, [])
    assert cfg == RunConfig()
    assert cfg.optim.lr == 1e-4  # the field's default_factory, not OptimSection's own default


def test_nested_yaml_merges_with_defaults(tmp_path):
    path = write(tmp_path, "a.yaml", "seed: 7\nmodel:\n  dim: 128\n  dtype: bfloat16\noptim:\n  max_steps: 10\n")
    cfg = load_config(RunConfig, path, [])
    assert cfg.seed == 7
    assert cfg.model == ModelSection(dim=128, dtype="bfloat16")
    # keys of a section the file does not name keep the section's current value, including default_factory ones
    assert cfg.optim == OptimSection(lr=1e-4, max_steps=10)
    assert isinstance(cfg.model, ModelSection)


def test_exponent_floats_without_dot_are_floats(tmp_path):
    # Plain PyYAML (YAML 1.1) reads these as strings; that is the bug being guarded against.
    assert yaml.safe_load("5e-6") == "5e-6"
    assert parse_value("5e-6") == 5e-6 and isinstance(parse_value("5e-6"), float)
    assert parse_value("1E5") == 1e5 and parse_value("-2.5e3") == -2500.0 and parse_value("1.0e5") == 1e5
    assert parse_value("5") == 5 and isinstance(parse_value("5"), int)
    assert parse_value("v1e5") == "v1e5" and parse_value("2024-01-01e5") == "2024-01-01e5"
    path = write(tmp_path, "a.yaml", "optim:\n  lr: 5e-6\n  lr_milestones: [1e-1, 9e-1]\nmodel:\n  norm_eps: 1e-6\n")
    cfg = load_config(RunConfig, path, ["model.dim=1e2"])
    assert cfg.optim.lr == 5e-6 and type(cfg.optim.lr) is float
    assert cfg.optim.lr_milestones == [0.1, 0.9]
    assert cfg.model.norm_eps == 1e-6
    assert cfg.model.dim == 100 and type(cfg.model.dim) is int  # integral float accepted for an int
    assert load_config(RunConfig, None, ["optim.lr=5e-6"]).optim.lr == 5e-6


def test_overrides_of_every_supported_type():
    cfg = load_config(
        RunConfig,
        None,
        [
            "seed=3",
            "optim.lr=2",  # an int for a float field becomes a float
            "model.tie_embeddings=true",
            "model.name=open_llama_3b",
            "model.checkpoint=/ckpt/model.safetensors",
            "model.dtype=bfloat16",
            "optim.no_decay=[bias, ln_f]",
            "optim.lr_milestones=[0.25, 1]",
            "optim.betas=[0.8, 0.99]",
            "lora.r=16",
        ],
    )
    assert cfg.seed == 3
    assert cfg.optim.lr == 2.0 and type(cfg.optim.lr) is float
    assert cfg.model.tie_embeddings is True
    assert cfg.model.name == "open_llama_3b"
    assert cfg.model.checkpoint == "/ckpt/model.safetensors"
    assert cfg.model.dtype == "bfloat16"
    assert cfg.optim.no_decay == ["bias", "ln_f"]
    assert cfg.optim.lr_milestones == [0.25, 1.0] and all(type(x) is float for x in cfg.optim.lr_milestones)
    assert cfg.optim.betas == (0.8, 0.99)
    assert cfg.lora == LoraSection(r=16)  # an absent optional section is created from its defaults
    # None for an optional field, and a section set whole from a mapping
    cfg = load_config(RunConfig, None, ["model.checkpoint=null", "lora={r: 2, alpha: 1e1}", "lora.alpha=3"])
    assert cfg.model.checkpoint is None
    assert cfg.lora == LoraSection(r=2, alpha=3.0)
    assert load_config(RunConfig, None, ["lora.r=2", "lora=null"]).lora is None


def test_overrides_apply_in_order():
    cfg = load_config(RunConfig, None, ["seed=1", "seed=2"])
    assert cfg.seed == 2


def test_required_fields(tmp_path):
    assert load_config(NeedsData, None, ["data_path=/data/hh.jsonl"]).data_path == "/data/hh.jsonl"
    with pytest.raises(ConfigError, match="missing required key 'data_path'"):
        load_config(NeedsData, None, [])


# ---------------------------------------------------------------------------------------------------------------
# errors


def test_unknown_key_in_yaml_names_key_file_and_valid_keys(tmp_path):
    path = write(tmp_path, "bad.yaml", "model:\n  dimm: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(RunConfig, path, [])
    msg = str(e.value)
    assert "'model.dimm'" in msg and "bad.yaml" in msg
    assert "name, dim, n_layers, norm_eps, tie_embeddings, checkpoint, dtype" in msg
    path = write(tmp_path, "bad_top.yaml", "sed: 1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'sed'.*the top level: seed, out_dir, model, optim, lora"):
        load_config(RunConfig, path, [])


def test_unknown_key_in_override_names_key_and_valid_keys():
    with pytest.raises(ConfigError) as e:
        load_config(RunConfig, None, ["optim.lrr=1e-5"])
    msg = str(e.value)
    assert "'optim.lrr'" in msg and "optim.lrr=1e-5" in msg
    assert "lr, betas, lr_milestones, no_decay, max_steps" in msg
    with pytest.raises(ConfigError, match="unknown key 'modle'"):
        load_config(RunConfig, None, ["modle.dim=3"])
    with pytest.raises(ConfigError, match="unknown key 'lora.rank'"):
        load_config(RunConfig, None, ["lora.rank=3"])


@pytest.mark.parametrize(
    "override, key, expected",
    [
        ("seed=abc", "seed", "int"),
        ("seed=2.5", "seed", "int"),
        ("seed=true", "seed", "int"),  # a bool is not an int
        ("optim.lr=fast", "optim.lr", "float"),
        ("optim.lr=[1e-5]", "optim.lr", "float"),
        ("model.tie_embeddings=1", "model.tie_embeddings", "bool"),
        ("model.name=5", "model.name", "str"),
        ("model.name=null", "model.name", "str"),
        ("model.checkpoint=3", "model.checkpoint", "str | None"),
        ("model.dtype=float16", "model.dtype", "Literal['float32', 'bfloat16']"),
        ("optim.no_decay=bias", "optim.no_decay", "list[str]"),
        ("optim.no_decay=[bias, 3]", "optim.no_decay[1]", "str"),
        ("optim.lr_milestones=[0.5, x]", "optim.lr_milestones[1]", "float"),
        ("optim.betas=[0.9]", "optim.betas", "tuple[float, float]"),
        ("model=3", "model", "ModelSection"),
        ("optim.lr.x=3", "optim.lr", "float"),
    ],
)
def test_wrong_type_errors_name_key_value_and_type(override, key, expected):
    with pytest.raises(ConfigError) as e:
        load_config(RunConfig, None, [override])
    msg = str(e.value)
    assert f"{key}=" in msg, msg
    assert f"not a valid {expected}" in msg, msg


def test_wrong_type_in_yaml_names_the_file(tmp_path):
    path = write(tmp_path, "t.yaml", "optim:\n  max_steps: lots\n")
    with pytest.raises(ConfigError, match=r"t\.yaml: optim\.max_steps='lots' is not a valid int"):
        load_config(RunConfig, path, [])


def test_malformed_files_and_overrides(tmp_path):
    with pytest.raises(ConfigError, match="mapping"):
        load_config(RunConfig, write(tmp_path, "list.yaml", "- 1\n- 2\n"), [])
    with pytest.raises(ConfigError, match="section 'model' must be a mapping|not a valid ModelSection"):
        load_config(RunConfig, write(tmp_path, "m.yaml", "model: [1, 2]\n"), [])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(RunConfig, None, ["seed"])
    assert load_config(RunConfig, write(tmp_path, "empty.yaml", ""), []) == RunConfig()


# ---------------------------------------------------------------------------------------------------------------
# base: inheritance


def test_base_inheritance_precedence(tmp_path):
    (tmp_path / "shared").mkdir()
    write(tmp_path, "shared/common.yaml", "seed: 1\nout_dir: runs/common\nmodel:\n  dim: 256\n  n_layers: 26\n")
    child = write(tmp_path, "rm.yaml", "base: shared/common.yaml\nseed: 2\nmodel:\n  n_layers: 4\n")
    cfg = load_config(RunConfig, child, [])
    assert cfg.seed == 2  # child overrides base
    assert cfg.out_dir == "runs/common"  # base fills what the child leaves out
    assert (cfg.model.dim, cfg.model.n_layers) == (256, 4)  # merged per key inside a section
    cfg = load_config(RunConfig, child, ["seed=3", "model.dim=8", "out_dir=runs/cli"])
    assert (cfg.seed, cfg.model.dim, cfg.model.n_layers, cfg.out_dir) == (3, 8, 4, "runs/cli")  # CLI overrides both


def test_base_is_recursive_and_relative_to_each_file(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "b").mkdir()
    write(tmp_path, "a/b/root.yaml", "seed: 1\nmodel:\n  name: root\n  dim: 1\n")
    write(tmp_path, "a/mid.yaml", "base: b/root.yaml\nmodel:\n  dim: 2\n")
    leaf = write(tmp_path, "leaf.yaml", "base: a/mid.yaml\nmodel:\n  n_layers: 3\n")
    cfg = load_config(RunConfig, leaf, [])
    assert (cfg.seed, cfg.model.name, cfg.model.dim, cfg.model.n_layers) == (1, "root", 2, 3)


def test_base_errors(tmp_path):
    with pytest.raises(ConfigError, match="base file 'nope.yaml' not found"):
        load_config(RunConfig, write(tmp_path, "x.yaml", "base: nope.yaml\n"), [])
    write(tmp_path, "p.yaml", "base: q.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(RunConfig, write(tmp_path, "q.yaml", "base: p.yaml\n"), [])
    write(tmp_path, "badbase.yaml", "model:\n  widht: 3\n")
    with pytest.raises(ConfigError, match=r"badbase\.yaml: unknown key 'model\.widht'"):
        load_config(RunConfig, write(tmp_path, "c.yaml", "base: badbase.yaml\n"), [])
    with pytest.raises(ConfigError, match="unknown key 'base'"):
        load_config(RunConfig, None, ["base=x.yaml"])  # `base` is a file-level key, not an override


def test_field_named_base_is_refused():
    @dataclass
    class Clash:
        base: str = "x"

    with pytest.raises(TypeError, match="reserve"):
        load_config(Clash, None, [])


# ---------------------------------------------------------------------------------------------------------------
# saving


def test_save_load_round_trip(tmp_path):
    cfg = load_config(
        RunConfig,
        None,
        [
            "optim.lr=5e-6",
            "model.norm_eps=1e-6",
            "model.name='1e5'",  # a string that looks like a float must come back a string
            "out_dir='null'",
            "model.checkpoint=null",
            "optim.betas=[0.9, 0.999]",
            "lora.alpha=0.5",
        ],
    )
    assert cfg.model.name == "1e5" and cfg.out_dir == "null"
    path = str(tmp_path / "saved" / "config.yaml")
    save_config(cfg, path)
    again = load_config(RunConfig, path, [])
    assert again == cfg
    assert type(again.optim.betas) is tuple and type(again.model.name) is str
    # saved in field order, every field present
    saved = yaml.safe_load(open(path))
    assert list(saved) == [f.name for f in dataclasses.fields(RunConfig)]
    assert saved == config_to_dict(cfg)


def test_config_to_dict_is_plain():
    d = config_to_dict(RunConfig(lora=LoraSection()))
    assert d["model"]["dim"] == 64 and d["optim"]["betas"] == [0.9, 0.95] and d["lora"] == {"r": 4, "alpha": 8.0}
    assert yaml.safe_load(yaml.safe_dump(d)) == d


# ---------------------------------------------------------------------------------------------------------------
# command line


def test_parse_cli():
    assert parse_cli([]) == (None, [])
    assert parse_cli(["--config", "c.yaml", "optim.lr=1e-5", "seed=2"]) == ("c.yaml", ["optim.lr=1e-5", "seed=2"])
    assert parse_cli(["seed=2", "--config=c.yaml"]) == ("c.yaml", ["seed=2"])
    assert parse_cli(["optim.lr=-1", "model.name=a=b"]) == (None, ["optim.lr=-1", "model.name=a=b"])


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--lr", "1e-5"], "unexpected argument '--lr'"),
        (["c.yaml"], "unexpected argument 'c.yaml'"),
        (["--config"], "needs a path"),
        (["--config", "a.yaml", "--config", "b.yaml"], "twice"),
        (["optim..lr=1"], "section.key=value"),
        (["=3"], "section.key=value"),
    ],
)
def test_parse_cli_errors_show_usage(argv, match):
    with pytest.raises(ConfigError, match=match) as e:
        parse_cli(argv, prog="train_rm")
    assert "usage: train_rm [--config PATH]" in str(e.value)


def test_parse_cli_help(capsys):
    with pytest.raises(SystemExit) as e:
        parse_cli(["--help"], prog="train_rm")
    assert e.value.code == 0
    assert "usage: train_rm" in capsys.readouterr().out


def test_cli_to_config_end_to_end(tmp_path):
    path = write(tmp_path, "run.yaml", "optim:\n  lr: 1e-5\n")
    cfg = load_config(RunConfig, *parse_cli(["--config", path, "optim.max_steps=5"]))
    assert (cfg.optim.lr, cfg.optim.max_steps) == (1e-5, 5)
