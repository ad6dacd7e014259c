"""The channel config: every mistake fails with a message naming the channel and the key."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from common.channel_config import ConfigError, load_config, parse_config
from trainer.channels import registry

ROOT = Path(__file__).resolve().parents[1]

BASE = {
    "merge": {"normalize": "rank", "rank_offset": 20},
    "channels": {
        "popular": {"kind": "list", "model": "popular", "weight": 0.3, "quota": 100},
        "itemcf": {"kind": "i2i", "model": "itemcf", "weight": 1.0, "quota": 200, "serve": {"recent_n": 20}},
        "mf": {"kind": "u2i", "model": "mf", "weight": 1.0, "quota": 200, "params": {"dim": 16}},
        "mf_i2i": {"kind": "i2i", "from": "mf", "weight": 0.3, "quota": 100},
    },
}


def config_with(channel: str | None = None, **entry) -> dict:
    raw = copy.deepcopy(BASE)
    if channel is not None:
        raw["channels"].setdefault(channel, {}).update(entry)
    return raw


def check(raw: dict) -> None:
    """What the nightly job and the evaluator do at start: generic fields, then model params."""
    cfg = parse_config(raw, "test.yaml")
    registry.validate_params(cfg, "test.yaml")


def fails(raw: dict, *needles: str) -> str:
    with pytest.raises(ConfigError) as err:
        check(raw)
    msg = str(err.value)
    for n in ("test.yaml", *needles):
        assert n in msg, f"{n!r} not in {msg!r}"
    return msg


def test_base_config_is_valid():
    cfg = parse_config(config_with(), "test.yaml")
    registry.validate_params(cfg, "test.yaml")
    assert [c.name for c in cfg.enabled()] == ["popular", "itemcf", "mf", "mf_i2i"]
    assert cfg.get("mf_i2i").publisher == "mf" and not cfg.get("mf_i2i").trained


@pytest.mark.parametrize("name", ["channels.yaml", "channels.all-models.yaml"])
def test_shipped_config_is_valid_and_every_model_exists(name):
    path = ROOT / "config" / name
    cfg = load_config(path)
    registry.validate_params(cfg, str(path))
    assert cfg.enabled(), "the shipped config enables no channel"
    known = registry.models()
    for spec in cfg.channels:
        owner = spec if spec.trained else cfg.get(spec.publisher)
        assert spec.kind in known[owner.model].kinds


@pytest.mark.parametrize("channel,entry,key", [
    ("itemcf", {"wieght": 1.0}, "wieght"),
    ("itemcf", {"serve": {"recent": 5}}, "serve.recent"),
    ("mf", {"params": {"factorz": 8}}, "params.factorz"),
])
def test_unknown_keys_name_channel_and_key(channel, entry, key):
    fails(config_with(channel, **entry), f"channel {channel!r}", key)


RENAMED = [  # (model, kind, old name, new name): one vocabulary across models (trainer/channels/base.py)
    ("mf", "u2i", "factors", "dim"), ("mf", "u2i", "regularization", "reg"), ("mf", "u2i", "iterations", "epochs"),
    ("mf", "u2i", "negatives", "num_negatives"), ("mf", "u2i", "bias_regularization", "bias_reg"),
    ("mf", "u2i", "i2i_k", "top_k"),
    ("item2vec", "i2i", "negative", "num_negatives"), ("item2vec", "i2i", "alpha", "lr"),
    ("item2vec", "i2i", "ns_exponent", "negatives_power"),
    ("itemcf", "i2i", "k", "top_k"), ("usercf", "u2u", "k", "top_k"), ("popular", "list", "size", "top_k"),
]


@pytest.mark.parametrize("model,kind,old,new", RENAMED, ids=[f"{m}.{o}" for m, _, o, _ in RENAMED])
def test_renamed_params_fail_at_load_naming_the_new_name(model, kind, old, new, tmp_path):
    msg = fails(config_with("chan", kind=kind, model=model, params={old: 1}), "channel 'chan'",
                f"key 'params.{old}'", f"renamed to {new!r}")
    assert model in msg
    registry.models()[model].Params(**{new: 1} if new != "negatives_power" else {new: 0.5})  # the new name works
    path = tmp_path / "old.yaml"  # and through the file loader the nightly job and the evaluator use
    path.write_text(yaml.safe_dump(config_with("chan", kind=kind, model=model, params={old: 1})))
    with pytest.raises(ConfigError, match=rf"old\.yaml.*channel 'chan', key 'params\.{old}'.*{new}"):
        registry.validate_params(load_config(path), str(path))


def test_renamed_params_fail_when_a_channel_is_built_directly():
    from common.channel_config import ChannelSpec
    from trainer.channels.base import RenamedParamError

    with pytest.raises(RenamedParamError, match="params.i2i_k: renamed to 'top_k'"):
        registry.build(ChannelSpec(name="mf", kind="u2i", model="mf", params={"i2i_k": 10}))


def test_every_renamed_target_is_in_the_vocabulary():
    from trainer.channels.base import VOCABULARY

    for model, cls in registry.models().items():
        for old, new in cls.renamed.items():
            assert new in VOCABULARY and new in cls.Params.model_fields, (model, old, new)
            assert old not in cls.Params.model_fields, (model, old)


def test_unknown_top_level_and_merge_keys():
    raw = config_with()
    raw["merge"]["normalise"] = "rank"
    fails(raw, "merge.normalise")
    raw = config_with()
    raw["chanels"] = {}
    fails(raw, "chanels")


@pytest.mark.parametrize("channel,entry,key", [
    ("mf", {"weight": -1}, "weight"),
    ("popular", {"quota": 0}, "quota"),
    ("itemcf", {"timeout_ms": "fast"}, "timeout_ms"),
    ("itemcf", {"serve": {"recency_decay": 2.0}}, "serve.recency_decay"),
    ("itemcf", {"kind": "x2y"}, "kind"),
    ("mf", {"params": {"dim": -3}}, "params.dim"),
    ("itemcf", {"params": {"alpha": 7}}, "params.alpha"),
    ("popular", {"enabled": "maybe"}, "enabled"),
])
def test_bad_values_name_channel_and_key(channel, entry, key):
    fails(config_with(channel, **entry), f"channel {channel!r}", f"key {key!r}")


def test_bad_merge_value():
    raw = config_with()
    raw["merge"]["normalize"] = "softmax"
    fails(raw, "merge.normalize")
    raw = config_with()
    raw["merge"]["rank_offset"] = 0
    fails(raw, "merge.rank_offset")


def test_unknown_model_names_channel_and_model():
    msg = fails(config_with("newthing", kind="i2i", model="nosuch"), "channel 'newthing'", "key 'model'", "nosuch")
    assert "itemcf" in msg  # lists the known models


def test_wrong_kind_for_model():
    fails(config_with("itemcf", kind="u2i"), "channel 'itemcf'", "key 'kind'", "'itemcf' emits")
    # a `from` channel must ask for a kind its source emits
    fails(config_with("pop_i2i", kind="i2i", **{"from": "popular"}), "channel 'pop_i2i'", "key 'kind'")


def test_bad_from():
    fails(config_with("x_i2i", kind="i2i", **{"from": "nosuch"}), "channel 'x_i2i'", "key 'from'", "nosuch")
    fails(config_with("y_i2i", kind="i2i", **{"from": "mf_i2i"}), "channel 'y_i2i'", "key 'from'",
          "itself a 'from' channel")
    fails(config_with("z_i2i", kind="i2i", **{"from": "mf"}, params={"dim": 8}), "channel 'z_i2i'",
          "'params' belong to the source")
    fails(config_with("w_i2i", kind="i2i", model="itemcf", **{"from": "mf"}), "channel 'w_i2i'", "exactly one")
    fails(config_with("v_i2i", kind="i2i"), "channel 'v_i2i'", "exactly one")


def test_bad_channel_names_and_shapes():
    fails(config_with("Bad-Name", kind="i2i", model="itemcf"), "channel 'Bad-Name'", "must match")
    raw = config_with()
    raw["channels"]["mf"] = "u2i"
    fails(raw, "channel 'mf'", "mapping")
    fails({"channels": []}, "'channels:' mapping")


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("channels: {itemcf: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    ok = tmp_path / "ok.yaml"
    ok.write_text(yaml.safe_dump(config_with("itemcf", quota=-5)))
    with pytest.raises(ConfigError, match=r"ok\.yaml.*channel 'itemcf', key 'quota'"):
        load_config(ok)
