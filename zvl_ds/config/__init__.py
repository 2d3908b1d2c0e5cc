"""Typed configuration: YAML with ``_base_`` inheritance, ``key.sub=value`` overrides, LAVIS ``run:`` options.

One concern per module: ``schema`` (the root ``Config``, its top-level keys and the rules that span sections), one
module per section (``data_section``, ``transforms_section``, ``model_section``, ``loss_section``, ``optim_section``,
``run_sections``, ``distill_section``: the keys that act, what each means, and the checks that concern that section
alone), ``load`` (YAML, ``_base_``, overrides, presets, typed conversion, then the checks), ``compat`` (LAVIS's
``run:`` block and the ZeroVL keys accepted without effect), ``reference`` (the generated tables of
docs/configuration.md and docs/lavis-zerovl.md); model presets live in ``zvl_ds.config.presets``.
``python -m zvl_ds.config CFG.yaml [key=value ...]`` prints the resolved config; config errors exit with code 2.

The names below are what the rest of zvl_ds imports from here.
"""
from zvl_ds.config.data_section import DataConfig, DatasetSource
from zvl_ds.config.distill_section import DistillConfig
from zvl_ds.config.load import config_from_dict, load_config
from zvl_ds.config.loss_section import LossConfig, SigmoidConfig, TemperatureConfig
from zvl_ds.config.model_section import (EmaConfig, ImageEncoderConfig, LoraOptions, ModelConfig, TextEncoderConfig,
                                         is_remote_location)
from zvl_ds.config.optim_section import LRConfig, OptimConfig
from zvl_ds.config.reference import README_TABLES
from zvl_ds.config.schema import Config, ConfigError, check_world_size
from zvl_ds.config.transforms_section import CaptionAugConfig, CaptionTextConfig, NormalizeConfig, TransformsConfig

__all__ = ["CaptionAugConfig", "CaptionTextConfig", "Config", "ConfigError", "DataConfig", "DatasetSource",
           "DistillConfig", "EmaConfig", "ImageEncoderConfig", "LoraOptions", "LossConfig", "LRConfig", "ModelConfig",
           "NormalizeConfig", "OptimConfig", "README_TABLES", "SigmoidConfig", "TemperatureConfig", "TextEncoderConfig",
           "TransformsConfig", "check_world_size", "config_from_dict", "is_remote_location", "load_config"]
