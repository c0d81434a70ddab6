"""Config loading: YAML presets, overrides, validation errors."""
import dataclasses
import pathlib

import pytest

from fluxir_jax import config
from fluxir_jax.errors import UserError
from fluxir_jax.models import presets
from fluxir_jax.models.flux import FluxConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", presets.names())
def test_yaml_presets_equal_python_presets(name):
    assert config.load(FluxConfig, ROOT / "configs" / "models" / f"{name}.yaml") == presets.get(name)


def test_overrides_coerce_types():
    cfg = config.load(FluxConfig, ROOT / "configs/models/flux-dev.yaml", overrides=["depth=2", "axes_dim=[8,28,28]", "hidden_size=768", "num_heads=12", "guidance_embed=false"])
    assert cfg.depth == 2 and cfg.axes_dim == (8, 28, 28) and cfg.guidance_embed is False
    assert isinstance(cfg.axes_dim, tuple)


def test_dump_and_reload(tmp_path):
    cfg = presets.get("tiny", remat_policy="full")
    config.dump(cfg, tmp_path / "c.yaml")
    assert config.load(FluxConfig, tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize(
    "overrides,msg",
    [
        (["depthh=2"], "unknown config key depthh"),
        (["depth=two"], "config field depth: expected int"),
        (["depth"], "not of the form key=value"),
        (["depth.x=1"], "unknown config key depth.x"),
    ],
)
def test_bad_overrides(overrides, msg):
    with pytest.raises(UserError, match=msg):
        config.load(FluxConfig, ROOT / "configs/models/tiny.yaml", overrides=overrides)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(UserError, match="not found"):
        config.load(FluxConfig, tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("depth: [1,\n")
    with pytest.raises(UserError, match="not valid YAML"):
        config.load(FluxConfig, tmp_path / "bad.yaml")


def test_nested_dataclasses():
    @dataclasses.dataclass
    class Inner:
        a: int = 1
        b: tuple[float, float] = (0.0, 1.0)

    @dataclasses.dataclass
    class Outer:
        inner: Inner = dataclasses.field(default_factory=Inner)
        name: str = "x"

    cfg = config.apply_overrides(Outer(), ["inner.a=3", "inner.b=[0.5, 2]"])
    assert cfg.inner == Inner(3, (0.5, 2.0))
    with pytest.raises(UserError, match="expected 2 items"):
        config.apply_overrides(Outer(), ["inner.b=[1,2,3]"])


def test_unknown_preset():
    with pytest.raises(UserError, match="unknown model preset"):
        presets.get("flux-pro")


def test_trainer_checks_the_config_before_building():
    """The library entry (Trainer) refuses what the CLI refuses, with the same one-line message."""
    from fluxir_jax import train_config
    from fluxir_jax.train_loop import Trainer

    cfg = train_config.load(str(pathlib.Path(__file__).resolve().parents[1] / "configs/train/tiny.yaml"),
                            ["batch_size=6", "optim.accum_steps=4"])
    with pytest.raises(UserError, match="batch_size=6 is not divisible by optim.accum_steps=4"):
        Trainer(cfg, mesh=None)


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "train").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_train_configs_and_their_slice_knobs_are_valid(path):
    """Every shipped train config passes the static checks, and so does each slice's knobs applied to it."""
    from fluxir_jax import train_config

    cfg = train_config.load(str(path))
    train_config.check_static(cfg)
    for name, knobs in cfg.slice_knobs.items():
        knobbed, applied = train_config.for_slice(cfg, name)
        assert applied == knobs and config.to_dict(knobbed) != config.to_dict(cfg)
