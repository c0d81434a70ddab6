"""config.json of a converted checkpoint: its format name and version are checked on every read."""
import json

import pytest

from fluxir_jax import checkpoint
from fluxir_jax.errors import UserError


def _write(tmp_path, **cfg):
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


def test_current_version_reads(tmp_path):
    d = _write(tmp_path, format=checkpoint.CHECKPOINT_FORMAT, format_version=checkpoint.CHECKPOINT_VERSION, items=[])
    assert checkpoint.read_config(d)["items"] == []
    assert (checkpoint.CHECKPOINT_FORMAT, checkpoint.CHECKPOINT_VERSION) == ("fluxir-checkpoint", 1)


@pytest.mark.parametrize("cfg,match", [
    (dict(format="fluxir-checkpoint", format_version=2), r"checkpoint format version 2 is not supported .*version 1"),
    (dict(format="fluxir-checkpoint"), r"checkpoint format version None is not supported"),
    (dict(format="something-else", format_version=1), r"not a fluxir checkpoint config"),
])
def test_other_versions_and_formats_are_refused(tmp_path, cfg, match):
    with pytest.raises(UserError, match=match) as e:
        checkpoint.read_config(_write(tmp_path, **cfg))
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=match):
        checkpoint.flux_config(tmp_path)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        checkpoint.read_config(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(UserError, match="invalid JSON"):
        checkpoint.read_config(tmp_path)
