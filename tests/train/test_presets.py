"""Model presets are defined once, in ptm/gin/models/*.gin, and read by name from TOML configs."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

import gin
from ptm import config
from ptm.errors import ConfigError
from ptm.model.config import ModelConfig, from_preset, from_spec, preset_fields, preset_names

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", preset_names())
def test_preset_reader_agrees_with_gin(name):
    """The gin-free reader of the experiment/search configs gives exactly what gin binds for the same file."""
    config.parse([f"models/{name}.gin"], [])
    via_gin = {f.name: gin.query_parameter(f"ModelConfig.{f.name}") for f in dataclasses.fields(ModelConfig)
               if f"ModelConfig.{f.name}" in gin.config_str()}
    assert via_gin == preset_fields(name)
    assert from_preset(name) == ModelConfig(**via_gin)


def test_every_shipped_toml_refers_to_a_preset():
    """No experiment or search config copies a model's fields (MaxText: each preset defined once)."""
    tomls = sorted((REPO / "configs").rglob("*.toml"))
    with_model = []
    for p in tomls:
        d = tomllib.loads(p.read_text())
        if "model" in d:
            with_model.append(p.name)
            m = d["model"]
            assert isinstance(m, str) or "preset" in m, f"{p}: [model] copies fields instead of naming a preset"
            from_spec(m, str(p))
    assert {"quick.toml", "full.toml", "micro.toml", "paper_7b.toml"} <= set(with_model)


def test_spec_forms_and_errors():
    assert from_spec("tiny", "x") == from_preset("tiny")
    assert from_spec({"preset": "tiny", "num_layers": 3}, "x").num_layers == 3
    assert from_spec({"embed_dim": 64}, "x").embed_dim == 64
    with pytest.raises(ConfigError, match="unknown model preset 'nope'.*tiny"):
        from_spec("nope", "x")
    with pytest.raises(ConfigError, match="x: unknown ModelConfig field"):
        from_spec({"preset": "tiny", "embed_dims": 3}, "x")
    with pytest.raises(ConfigError, match="x: model must be a preset name or a table"):
        from_spec(3, "x")
