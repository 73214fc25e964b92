"""ExperimentConfig: the shipped YAML loads, `--set` overrides, and every error names its key."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import yaml

from recsys.errors import ConfigError
from training.config import ExperimentConfig, apply_overrides, load_config

REPO = Path(__file__).resolve().parents[2]
AUTOINT_YAML = REPO / "configs" / "autoint_ml100k.yaml"


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    """A copy of the shipped config, for tests that edit it."""
    path = tmp_path / "config.yaml"
    path.write_text(AUTOINT_YAML.read_text())
    return path


def _write(tmp_path: Path, raw: dict[str, Any]) -> Path:
    path = tmp_path / "edited.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_shipped_autoint_config_loads_every_value() -> None:
    raw = yaml.safe_load(AUTOINT_YAML.read_text())
    cfg = load_config(AUTOINT_YAML)
    assert isinstance(cfg, ExperimentConfig)
    for section, values in raw.items():
        for key, value in values.items():
            assert getattr(getattr(cfg, section), key) == value, f"{section}.{key}"


def test_no_file_gives_the_defaults() -> None:
    assert load_config(None) == ExperimentConfig()


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config: file .*absent\.yaml does not exist"):
        load_config(tmp_path / "absent.yaml")


def test_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("model: {name: autoint\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML"):
        load_config(path)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.num_head=4", r"unknown key 'model\.num_head'; did you mean 'model\.num_heads'\?"),
        ("train.epochs=1", r"unknown key 'train\.epochs'; did you mean 'train\.max_epochs'\?"),
        ("trian.seed=1", r"unknown key 'trian'; did you mean 'train'\?"),
        (
            "model.name=autoit",
            (
                r"model\.name: unknown value 'autoit'; did you mean 'autoint'\? \(expected "
                r"one of autoint, armnet, esmm, adaptdhm"
            ),
        ),
    ],
)
def test_unknown_key_names_the_closest_valid_key_as_a_full_key(
    config_file: Path, override: str, expected: str
) -> None:
    """The hint is pasteable into --set, and a bad --set is not blamed on the file."""
    with pytest.raises(ConfigError, match="^--set: " + expected):
        load_config(config_file, [override])


def test_unknown_key_in_the_file_names_the_file_and_closest_key(tmp_path: Path) -> None:
    raw = yaml.safe_load(AUTOINT_YAML.read_text())
    raw["model"]["num_head"] = raw["model"].pop("num_heads")
    path = _write(tmp_path, raw)
    with pytest.raises(
        ConfigError,
        match=r"edited\.yaml: unknown key 'model\.num_head'; did you mean 'model\.num_heads'\?",
    ):
        load_config(path)


def test_overrides_set_nested_keys_with_yaml_types(config_file: Path) -> None:
    cfg = load_config(
        config_file,
        [
            "train.dense_lr=1e-3",
            "train.table_lr=0.5",
            "train.seed=7",
            "model.dnn_hidden_units=[400,400]",
            "model.use_scale=true",
            "ray.address=null",
            "output.run_name=a=b",  # only the first '=' separates key and value
        ],
    )
    assert cfg.train.dense_lr == pytest.approx(1e-3)
    assert isinstance(cfg.train.dense_lr, float)
    assert cfg.train.table_lr == 0.5
    assert cfg.train.seed == 7
    assert cfg.model.dnn_hidden_units == (400, 400)
    assert cfg.model.use_scale is True
    assert cfg.ray.address is None
    assert cfg.output.run_name == "a=b"
    # untouched values keep the file's
    assert cfg.model.num_heads == yaml.safe_load(AUTOINT_YAML.read_text())["model"]["num_heads"]


def test_override_creates_a_missing_section() -> None:
    cfg = load_config(None, ["embedding.dim=8", "data.dataset=synthetic-ctr"])
    assert cfg.embedding.dim == 8
    assert cfg.data.dataset == "synthetic-ctr"


def test_overrides_do_not_mutate_the_raw_dict() -> None:
    raw = {"train": {"seed": 0}}
    result = apply_overrides(raw, ["train.seed=3"])
    assert result == {"train": {"seed": 3}}
    assert raw == {"train": {"seed": 0}}


def test_later_override_wins(config_file: Path) -> None:
    cfg = load_config(config_file, ["train.seed=1", "train.seed=2"])
    assert cfg.train.seed == 2


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.seed", r"--set: 'train\.seed' is not of the form key=value"),
        ("train.seed.deep=1", r"--set: 'train\.seed\.deep' goes through a value, not a section"),
    ],
)
def test_bad_override_syntax(config_file: Path, override: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_config(config_file, [override])


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.batch_size=-1", r"train\.batch_size: .*greater than or equal to 1 \(got -1\)"),
        ("train.dense_lr=0", r"train\.dense_lr: .*greater than 0 \(got 0\)"),
        ("ray.num_workers=0", r"ray\.num_workers: .*greater than or equal to 1 \(got 0\)"),
        (
            "model.dnn_hidden_units=[400,0]",
            r"model\.dnn_hidden_units\.1: .*greater than or equal to 1 \(got 0\)",
        ),
        (
            "data.dataset=criteo",
            r"data\.dataset: .*'ml100k-ctr', .*'synthetic-ctr' or 'parquet' \(got 'criteo'\)",
        ),
        ("output.model_name=a/b", r"output\.model_name: .*pattern.*\(got 'a/b'\)"),
    ],
)
def test_invalid_value_names_the_key(config_file: Path, override: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_config(config_file, [override])


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.seed=[1,", r"--set: the value of 'train\.seed' is not valid YAML \(got '\[1,'"),
        ("train.seed=-1", r"train\.seed: .*greater than or equal to 0 \(got -1\)"),
        ("train.seed=4294967296", r"train\.seed: .*less than 4294967296"),
    ],
)
def test_an_unreadable_value_or_seed_is_a_config_error(
    config_file: Path, override: str, expected: str
) -> None:
    # a negative seed passed validation, then crashed numpy's RNG while encoding the splits
    with pytest.raises(ConfigError, match=expected):
        load_config(config_file, [override])


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("exp #2", "exp #2"),  # YAML would drop ' #2' as a comment
        ("20240101", "20240101"),  # ... read a number
        ("2024-06-01", "2024-06-01"),  # ... a date
        ("on", "on"),  # ... a boolean
        ("'quoted'", "quoted"),
        ("null", None),
    ],
)
def test_string_settings_keep_the_text_as_typed(
    config_file: Path, value: str, expected: str | None
) -> None:
    assert load_config(config_file, [f"output.run_name={value}"]).output.run_name == expected


def test_an_ipv6_address_reaches_the_ray_setting_unparsed(config_file: Path) -> None:
    # `--address [::1]:6379` becomes this override: as YAML it was a broken flow sequence
    assert load_config(config_file, ["ray.address=[::1]:6379"]).ray.address == "[::1]:6379"
    units = load_config(config_file, ["model.dnn_hidden_units=[8, 4]"]).model.dnn_hidden_units
    assert units == (8, 4)  # other settings still read YAML


def test_a_config_that_is_not_a_file_of_sections_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=rf"config: cannot read {tmp_path} \(Is a directory\)"):
        load_config(tmp_path, [])
    listed = tmp_path / "list.yaml"
    listed.write_text("- data\n- model\n")
    with pytest.raises(ConfigError, match=r"expected sections .* \(got a list\)"):
        load_config(listed, ["ray.num_workers=1"])


def test_parquet_dataset_needs_a_path(config_file: Path, tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError,
        match=r"data\.path is required when data\.dataset is "
        r"'parquet'",
    ):
        load_config(config_file, ["data.dataset=parquet"])
    cfg = load_config(config_file, ["data.dataset=parquet", f"data.path={tmp_path}"])
    assert cfg.data.path == str(tmp_path)


@pytest.mark.parametrize(("heads", "dim"), [(3, 64), (5, 16), (64, 32)])
def test_heads_must_divide_attention_dim(config_file: Path, heads: int, dim: int) -> None:
    with pytest.raises(
        ConfigError,
        match=rf"attention_dim={dim} must be divisible by num_heads={heads} "
        rf"\(got remainder {dim % heads}\)",
    ):
        load_config(config_file, [f"model.num_heads={heads}", f"model.attention_dim={dim}"])


def test_heads_dividing_attention_dim_is_accepted(config_file: Path) -> None:
    cfg = load_config(config_file, ["model.num_heads=4", "model.attention_dim=32"])
    assert (cfg.model.num_heads, cfg.model.attention_dim) == (4, 32)
    assert cfg.model.head_dim == 8


def test_config_is_frozen() -> None:
    cfg = load_config(AUTOINT_YAML)
    with pytest.raises(ValueError, match="frozen"):
        cfg.train.seed = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["embedding.dim=6"], "embedding.dim=6"),
        (
            [
                "embedding.variant=unified",
                "embedding.param_budget=4000",
                "embedding.unified.chunk_dim=2",
            ],
            "embedding.unified.chunk_dim=2",
        ),
        (
            ["embedding.variant=lowrank", "embedding.lowrank={ranks: {user_id: 3}}"],
            "embedding.lowrank.ranks.user_id=3",
        ),
    ],
)
def test_table_widths_not_divisible_by_4_are_refused_naming_the_key(
    overrides: list[str], key: str
) -> None:
    """With every table sharded (no replication) the config alone decides: refused at load."""
    with pytest.raises(ConfigError, match="multiple of 4") as info:
        load_config(None, [*overrides, "train.replicate_max_mb=0"])
    assert key in str(info.value)


def test_with_replication_widths_are_checked_per_table() -> None:
    """Replicated tables may have any width; a table too large to replicate still needs a
    multiple of 4, and the error names it and the replication size that would fix it."""
    from torchrec.modules.embedding_configs import EmbeddingBagConfig

    from training.sharding import check_table_widths

    cfg = load_config(None, ["embedding.dim=2", "train.replicate_max_mb=1"])
    small = EmbeddingBagConfig(num_embeddings=1000, embedding_dim=2, name="t_small")
    large = EmbeddingBagConfig(num_embeddings=200_000, embedding_dim=2, name="t_large")
    check_table_widths([small], cfg.train.replicate_max_mb)  # 8 KB: replicated, any width
    with pytest.raises(ConfigError, match="multiple of 4") as info:
        check_table_widths([small, large], cfg.train.replicate_max_mb)
    assert "t_large" in str(info.value) and "train.replicate_max_mb >= 1.53" in str(info.value)
    check_table_widths([large], 1.53)  # the size the message asks for is enough


def test_widths_divisible_by_4_are_accepted() -> None:
    cfg = load_config(
        None, ["embedding.variant=lowrank", "embedding.lowrank={ranks: {user_id: 4}}"]
    )
    assert cfg.embedding.lowrank is not None and cfg.embedding.lowrank.ranks == {"user_id": 4}


def test_settings_the_chosen_embedding_variant_ignores_are_warned_about(
    config_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="training.config")
    load_config(config_file, ["embedding.param_budget=20000", "embedding.unified.num_tables=4"])
    warned = [r.getMessage() for r in caplog.records]
    tail = "is set but embedding.variant is 'per_feature', which does not use it"
    assert warned == [
        f"config: embedding.param_budget {tail}",
        f"config: embedding.unified.num_tables {tail}",
    ]
    caplog.clear()
    unified = REPO / "configs" / "autoint_unified_ml100k.yaml"
    load_config(unified, ["embedding.unified.num_tables=4"])
    assert not caplog.records
