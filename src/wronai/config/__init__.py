"""Typed configuration for a WronAI run (see docs/configuration.md)."""

from wronai.config.loader import LoadedConfig, dump_config, load_config, load_config_with_notes
from wronai.config.schema import WronAIConfig
from wronai.config.sections.data import DataSection
from wronai.config.sections.model import LoraSection, ModelConfig, QuantizationSection, TinyModelSpec
from wronai.config.sections.polish import PolishSection
from wronai.config.sections.run import ExtensionsSection, HardwareSection, LoggingSection
from wronai.config.sections.training import TrainingSection

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
