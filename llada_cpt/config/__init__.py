"""Configuration: typed dataclasses, YAML + dotted overrides, validation."""
from .loader import config_from_dict, config_to_dict, dump_config, load_config, parse_overrides
from .schema import (
    CheckpointConfig,
    Config,
    DataConfig,
    DiffusionConfig,
    LoggingConfig,
    ModelConfig,
    ParallelConfig,
    TrainConfig,
)
from .validation import validate

__all__ = ["Config", "ModelConfig", "ParallelConfig", "DiffusionConfig", "DataConfig", "TrainConfig",
           "CheckpointConfig", "LoggingConfig", "load_config", "config_from_dict", "config_to_dict",
           "dump_config", "parse_overrides", "validate"]
