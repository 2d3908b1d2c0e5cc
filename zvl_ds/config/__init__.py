"""Typed configuration: YAML with ``_base_`` inheritance, ``key.sub=value`` overrides, LAVIS ``run:`` options.

One concern per module: ``schema`` (the sections and the keys that act, with what each means), ``load`` (YAML,
``_base_``, overrides, presets, typed conversion, validation), ``compat`` (LAVIS's ``run:`` block and the ZeroVL keys
accepted without effect), ``reference`` (the generated tables of docs/configuration.md and docs/lavis-zerovl.md);
model presets live in ``zvl_ds.config.presets``.
``python -m zvl_ds.config CFG.yaml [key=value ...]`` prints the resolved config; config errors exit with code 2.

The names below are what the rest of zvl_ds imports from here.
"""
from zvl_ds.config.load import check_world_size, config_from_dict, load_config
from zvl_ds.config.reference import README_TABLES
from zvl_ds.config.schema import (CaptionAugConfig, CaptionTextConfig, Config, ConfigError, DataConfig, DatasetSource,
                                  ImageEncoderConfig, LossConfig, LRConfig, ModelConfig, NormalizeConfig, OptimConfig,
                                  SigmoidConfig, TemperatureConfig, TextEncoderConfig, TransformsConfig)

__all__ = ["CaptionAugConfig", "CaptionTextConfig", "Config", "ConfigError", "DataConfig", "DatasetSource",
           "ImageEncoderConfig", "LossConfig", "LRConfig", "ModelConfig", "NormalizeConfig", "OptimConfig",
           "README_TABLES", "SigmoidConfig", "TemperatureConfig", "TextEncoderConfig", "TransformsConfig",
           "check_world_size", "config_from_dict", "load_config"]
