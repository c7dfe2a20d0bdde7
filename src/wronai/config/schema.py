"""The typed configuration: WronAIConfig, one field per YAML group (the groups live in config/sections/).

The groups' descriptions are the reference documentation: ``docs/configuration.md`` is generated from them
(``wronai config-docs``) and a test keeps the two in sync.
"""

from __future__ import annotations

from pydantic import Field

from wronai.config.sections.base import Section
from wronai.config.sections.data import DataSection
from wronai.config.sections.model import LoraSection, ModelConfig, QuantizationSection
from wronai.config.sections.polish import PolishSection
from wronai.config.sections.run import ExtensionsSection, HardwareSection, LoggingSection
from wronai.config.sections.training import TrainingSection


class WronAIConfig(Section):
    """A whole WronAI run."""

    model: ModelConfig
    lora: LoraSection = Field(default_factory=LoraSection)
    quantization: QuantizationSection = Field(default_factory=QuantizationSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    data: DataSection
    polish: PolishSection = Field(default_factory=PolishSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)
    hardware: HardwareSection = Field(default_factory=HardwareSection)
    extensions: ExtensionsSection = Field(default_factory=ExtensionsSection)
