"""Typed configuration for a WronAI run (see docs/configuration.md)."""

from wronai.config.loader import LoadedConfig, dump_config, load_config, load_config_with_notes
from wronai.config.schema import (
    DataSection,
    ExtensionsSection,
    HardwareSection,
    LoggingSection,
    LoraSection,
    ModelConfig,
    PolishSection,
    QuantizationSection,
    TinyModelSpec,
    TrainingSection,
    WronAIConfig,
)

__all__ = [
    "DataSection",
    "ExtensionsSection",
    "HardwareSection",
    "LoadedConfig",
    "LoggingSection",
    "LoraSection",
    "ModelConfig",
    "PolishSection",
    "QuantizationSection",
    "TinyModelSpec",
    "TrainingSection",
    "WronAIConfig",
    "dump_config",
    "load_config",
    "load_config_with_notes",
]
