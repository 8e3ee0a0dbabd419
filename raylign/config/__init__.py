"""One typed config tree for every raylign job: YAML plus dotted command-line overrides, checked on load.

- ``schema``: the dataclasses (a help text and bounds per field);
- ``loader``: YAML + overrides -> method presets -> typed build -> ``rules`` -> ``RaylignConfig``;
- ``docs``: the generated reference (``raylign config-docs``);
- ``trl`` / ``trl_table``: a flat TRL config (GRPOConfig/DPOConfig/SFTConfig keys) mapped through one table.
"""

from raylign.config.docs import config_reference_markdown
from raylign.config.loader import config_from_dict, config_to_dict, load_config, parse_overrides, save_config
from raylign.config.rules import validate
from raylign.config.schema import (
    DPO_LOSS_TYPES,
    OFFLINE_METHODS,
    ONLINE_METHODS,
    REPORT_TO,
    ConfigError,
    DataConfig,
    DPOConfig,
    GRPOConfig,
    LearnerConfig,
    LoggingConfig,
    LoraConfig,
    ModelConfig,
    RaylignConfig,
    RewardConfig,
    RolloutConfig,
    SFTConfig,
    SyncConfig,
    TrainConfig,
)

__all__ = [
    "DPO_LOSS_TYPES", "OFFLINE_METHODS", "ONLINE_METHODS", "REPORT_TO", "ConfigError", "DataConfig", "DPOConfig",
    "GRPOConfig", "LearnerConfig", "LoggingConfig", "LoraConfig", "ModelConfig", "RaylignConfig", "RewardConfig",
    "RolloutConfig", "SFTConfig", "SyncConfig", "TrainConfig", "config_from_dict", "config_reference_markdown",
    "config_to_dict", "load_config", "parse_overrides", "save_config", "validate",
]
