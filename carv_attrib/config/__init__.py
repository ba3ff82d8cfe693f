"""One typed config per stage, defined once: the library takes it, the CLI is generated from it.

Every field carries its help text, default and (for the CLI) its flag names in `metadata`, so a
default or a help line exists in exactly one place; `carv_attrib.cli.options` turns a config class
into a Typer command signature, and `validate()` refuses bad values with a `UsageError` (exit 2)
naming the flag. Options that several commands share (`--model`, `--density`, `--output-fn`,
`--draws`, `--device`, `--dtype`, `--seed`, `--overwrite`) are built by one function each in `config.options`, so
a flag means the same thing in every command (kronfluence's `arguments.py`, sqlite-utils' shared
options).

This module is torch-free: the CLI imports it to build `--help`.

    from carv_attrib.config import FeaturizeConfig
    cfg = FeaturizeConfig(run="runs/demo", model="models/tiny-wan", draws=8).validate()

The package holds one module per stage (`encode`, `finetune`, `featurize` with `index`, `score`, `plan`,
`evaluate`), `tools` for the commands around them, `options` for what they share and `checks` for
validation; every public name is re-exported here.
"""

from __future__ import annotations

from carv_attrib.choices import (
    AGGREGATES,
    CURATE_METHODS,
    DTYPES,
    EXECUTORS,
    FORMATS,
    LATENT_DTYPES,
    MATRIX_KINDS,
    NOISE_MODES,
    OBJECTIVES,
    OUTPUT_FNS,
    PRECONDITIONERS,
    PROJECTORS,
    SCHEMES,
)
from carv_attrib.config.checks import (
    check_choice,
    check_distribution,
    check_min,
    parse_kron_dims,
    parse_shard,
    parse_size,
    parse_top_k,
)
from carv_attrib.config.cost import CostConfig
from carv_attrib.config.encode import EncodeConfig
from carv_attrib.config.evaluate import MIN_EVAL_QUERIES, MIN_EVAL_SUBSETS, MIN_EVAL_TRAIN, EvaluateConfig
from carv_attrib.config.featurize import FeaturizeConfig, IndexConfig
from carv_attrib.config.finetune import FinetuneConfig
from carv_attrib.config.options import (
    DEFAULT_KRON_DIMS,
    DEFAULT_LAYERS,
    DEFAULT_OUTPUT_FN,
    DEFAULT_PRECONDITION,
    StageConfig,
    batch_clips_option,
    choice_help,
    density_option,
    device_option,
    draws_option,
    dry_run_option,
    dtype_option,
    executor_option,
    lock_held_option,
    model_option,
    option,
    output_fn_option,
    overwrite_option,
    parts_option,
    ray_address_option,
    run_argument,
    seed_option,
    shard_option,
    timesteps_option,
    wait_option,
)
from carv_attrib.config.plan import PlanConfig
from carv_attrib.config.score import ScoreConfig
from carv_attrib.config.tools import (
    CurateConfig,
    DemoConfig,
    FramesConfig,
    GenerateConfig,
    ReportConfig,
)

__all__ = [
    "AGGREGATES",
    "CURATE_METHODS",
    "CurateConfig",
    "DEFAULT_KRON_DIMS",
    "DEFAULT_LAYERS",
    "DEFAULT_OUTPUT_FN",
    "DEFAULT_PRECONDITION",
    "DTYPES",
    "DemoConfig",
    "EXECUTORS",
    "EncodeConfig",
    "EvaluateConfig",
    "FORMATS",
    "FeaturizeConfig",
    "FinetuneConfig",
    "FramesConfig",
    "GenerateConfig",
    "IndexConfig",
    "LATENT_DTYPES",
    "MATRIX_KINDS",
    "MIN_EVAL_QUERIES",
    "MIN_EVAL_SUBSETS",
    "MIN_EVAL_TRAIN",
    "NOISE_MODES",
    "OBJECTIVES",
    "OUTPUT_FNS",
    "PRECONDITIONERS",
    "PROJECTORS",
    "PlanConfig",
    "CostConfig",
    "ReportConfig",
    "SCHEMES",
    "ScoreConfig",
    "StageConfig",
    "batch_clips_option",
    "choice_help",
    "check_choice",
    "check_distribution",
    "check_min",
    "density_option",
    "device_option",
    "draws_option",
    "dry_run_option",
    "dtype_option",
    "executor_option",
    "model_option",
    "option",
    "output_fn_option",
    "overwrite_option",
    "wait_option",
    "lock_held_option",
    "parse_kron_dims",
    "parse_shard",
    "parse_size",
    "parse_top_k",
    "parts_option",
    "ray_address_option",
    "run_argument",
    "seed_option",
    "shard_option",
    "timesteps_option",
]
