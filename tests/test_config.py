"""Config loading: strict keys, types, ranges, overrides and the shipped files."""

from __future__ import annotations

from pathlib import Path

import pytest

from transformer.config import (
    Config,
    ConfigError,
    config_from_dict,
    load_config,
    parse_overrides,
    save_config,
)

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_defaults_are_valid():
    Config().validate()


def test_unknown_key_names_path_and_suggests():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"training": {"lr_warmup": 100}})
    assert str(e.value) == (
        "training.lr_warmup: unknown key; did you mean training.warmup_steps?"
    )


def test_unknown_key_close_spelling():
    with pytest.raises(ConfigError, match=r"model\.d_modle: .*model\.d_model\?"):
        config_from_dict({"model": {"d_modle": 128}})


def test_unknown_section():
    with pytest.raises(
        ConfigError, match=r"^trainig: unknown key; did you mean training"
    ):
        config_from_dict({"trainig": {}})


@pytest.mark.parametrize(
    "tree, message",
    [
        (
            {"model": {"d_model": "big"}},
            r"model\.d_model: expected an integer \(got 'big'\)",
        ),
        (
            {"model": {"norm_first": "yes"}},
            r"model\.norm_first: expected true or false",
        ),
        ({"training": {"lr": "fast"}}, r"training\.lr: expected a number"),
        ({"model": {"activation": "tanh"}}, r"model\.activation: must be one of"),
        ({"training": {"betas": [0.9]}}, r"training\.betas: expected a list of 2"),
        ({"data": {"tokenizer": 5}}, r"data\.tokenizer: expected a mapping"),
        ({"model": {"n_heads": 3}}, r"model\.d_model: must be divisible by"),
        ({"training": {"label_smoothing": 1.5}}, r"training\.label_smoothing: .*1\.5"),
        ({"decoding": {"top_p": 0.0}}, r"decoding\.top_p"),
        ({"decoding": {"nbest": 6, "beam_size": 5}}, r"decoding\.nbest"),
        ({"data": {"max_tokens": 0}}, r"data\.max_tokens: must be positive"),
    ],
)
def test_bad_values_name_key_and_value(tree, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(tree)


def test_overrides_are_yaml_and_validated():
    cfg = config_from_dict(
        {"data": {"dir": "d"}},
        [
            "training.max_steps=7",
            "training.betas=[0.8, 0.9]",
            "model.norm_first=true",
            "data.tokenizer.model_type=bpe",
            "data.test_split=null",
        ],
    )
    assert cfg.training.max_steps == 7
    assert cfg.training.betas == (0.8, 0.9)
    assert cfg.model.norm_first is True
    assert cfg.data.tokenizer.model_type == "bpe"
    assert cfg.data.test_split is None
    with pytest.raises(ConfigError, match=r"training\.max_steps: expected an integer"):
        config_from_dict({"data": {"dir": "d"}}, ["training.max_steps=many"])
    with pytest.raises(ConfigError, match=r"training\.warmpu: unknown key"):
        config_from_dict({"data": {"dir": "d"}}, ["training.warmpu=5"])


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        parse_overrides(["training.max_steps"])
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_overrides(["training.betas=[0.9"])


def test_load_config_errors_name_the_file(tmp_path):
    missing = tmp_path / "none.yaml"
    with pytest.raises(ConfigError, match="none.yaml: cannot read config"):
        load_config(missing)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("model:\n  dropout: 2\n")
    with pytest.raises(ConfigError, match=r"wrong.yaml: model\.dropout"):
        load_config(wrong)


def test_save_and_reload_round_trip(tmp_path):
    cfg = config_from_dict(
        {"data": {"dir": "d"}}, ["model.d_model=128", "model.n_heads=4"]
    )
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.training.run_dir.startswith("checkpoints/")


def test_shipped_config_files_exist():
    names = {p.name for p in CONFIGS}
    assert {
        "multi30k_de_en.yaml",
        "multi30k_en_de.yaml",
        "transformer_base.yaml",
        "toy_copy.yaml",
    } <= names


@pytest.mark.parametrize(
    "tree, message",
    [
        ({"training": {"zzzz": 1}}, "training.zzzz: unknown key"),
        ({"qqqq": {"a": 1}}, "qqqq: unknown key"),
        ({"data": {"tokenizer": {"xqxq": 1}}}, "data.tokenizer.xqxq: unknown key"),
    ],
)
def test_unknown_key_without_a_near_match_names_itself(tree, message):
    with pytest.raises(ConfigError) as e:
        config_from_dict(tree)
    assert str(e.value) == message  # and no "did you mean" without a candidate


def test_every_unknown_key_is_named():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"model": {"d_modle": 1, "zzzz": 2}})
    assert str(e.value).splitlines() == [
        "model.d_modle: unknown key; did you mean model.d_model?",
        "model.zzzz: unknown key",
    ]


def test_scientific_notation_is_a_number(tmp_path):
    cfg = config_from_dict({}, ["training.lr=1e-4", "data.max_tokens=25e3"])
    assert cfg.training.lr == 1e-4
    assert cfg.data.max_tokens == 25000 and isinstance(cfg.data.max_tokens, int)
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  lr: 5E-4\n  eps: 1e-9\n  betas: [0.9, 9.8e-1]\n")
    cfg = load_config(path)
    assert (cfg.training.lr, cfg.training.eps, cfg.training.betas) == (
        5e-4,
        1e-9,
        (0.9, 0.98),
    )
    with pytest.raises(ConfigError, match=r"training\.max_steps: expected an integer"):
        config_from_dict({}, ["training.max_steps=2.5"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["data.max_length=64", "model.max_positions=64"],
            r"data\.max_length: must be below model\.max_positions=64",
        ),
        (
            ["training.best_metric=bleu", "training.valid_bleu=false"],
            r"training\.best_metric: needs training\.valid_bleu: true",
        ),
        (
            ["data.tokenizer.joint=false", "model.tie_src_tgt_embeddings=true"],
            r"model\.tie_src_tgt_embeddings: needs a joint tokenizer",
        ),
        (["training.dist_timeout=0"], r"training\.dist_timeout: must be positive"),
    ],
)
def test_settings_that_fail_together_are_errors_at_load(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({}, overrides)


def test_stored_configs_of_older_checkpoints_stay_usable():
    from transformer.checkpoint import checkpoint_config

    old = Config().to_dict()
    old["training"].update(schedule="noam", lr=2.0, warmup_steps=4000)
    old["model"].update(d_model=512, max_positions=64)  # data.max_length is 100
    cfg = checkpoint_config({"format": 1, "config": old})
    assert cfg.training.lr == pytest.approx(2.0 * 512**-0.5 * 4000**-0.5)
    assert checkpoint_config({"format": 2, "config": old}).training.lr == 2.0


def test_an_option_of_another_architecture_is_refused(tmp_path, caplog):
    rnn = tmp_path / "rnn.yaml"
    rnn.write_text("model:\n  arch: rnn\n  d_model: 64\n  n_heads: 4\n  d_ff: 8\n")
    with pytest.raises(ConfigError) as e:
        load_config(rnn)
    assert str(e.value).splitlines() == [
        f"{rnn}: model.n_heads: an option of model.arch transformer or "
        "decoder_only, not of rnn",
        f"{rnn}: model.d_ff: an option of model.arch transformer or "
        "decoder_only, not of rnn",
    ]
    de_en = next(p for p in CONFIGS if p.name == "multi30k_de_en.yaml")
    with pytest.raises(ConfigError, match="command line: model.rnn_hidden: an "):
        load_config(de_en, ["model.rnn_hidden=128"])
    with pytest.raises(ConfigError, match="encoder_layers: an option of model.arch"):
        load_config(de_en, ["model.arch=decoder_only", "model.encoder_layers=4"])
    # a Transformer file run as another architecture: its own keys are dropped,
    # named in a warning; what the command line typed is still checked
    cfg = load_config(de_en, ["model.arch=rnn", "model.rnn_hidden=64"])
    assert (cfg.model.arch, cfg.model.rnn_hidden) == ("rnn", 64)
    assert not hasattr(cfg.model, "n_heads")
    assert "model.n_heads" in caplog.text and "chose model.arch=rnn" in caplog.text
    with pytest.raises(ConfigError, match="command line: model.d_ff: an option"):
        load_config(de_en, ["model.arch=rnn", "model.d_ff=64"])
    with pytest.raises(ConfigError, match="model.arch: must be one of"):
        load_config(de_en, ["model.arch=lstm"])


def test_a_stored_flat_model_section_loads_as_its_architecture():
    """Checkpoints written before the split stored every architecture's keys."""
    from transformer.checkpoint import checkpoint_config

    flat = {
        "arch": "rnn", "d_model": 32, "n_heads": 8, "d_ff": 2048, "norm_first": True,
        "encoder_layers": 2, "rnn_hidden": 64, "attention": "hard",
        "gumbel_temperature": 0.5, "positional": "learned",
    }  # fmt: skip
    stored = {**Config().to_dict(), "model": flat}
    cfg = checkpoint_config({"format": 2, "config": stored})
    assert type(cfg.model).__name__ == "RNNConfig"
    assert (cfg.model.rnn_hidden, cfg.model.gumbel_temperature) == (64, 0.5)
    assert not hasattr(cfg.model, "n_heads")
