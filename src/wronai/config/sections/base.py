"""The base of every config group: unknown keys are errors, YAML's true/false read as a field's on/off choice."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

from wronai.config.annotations import choices, switch_words


class Section(BaseModel):
    """Base for every group: unknown keys are errors, values are checked on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    @field_validator("*", mode="before")
    @classmethod
    def _yaml_switch(cls, value: Any, info: ValidationInfo) -> Any:
        """`eval_strategy: no` (YAML: False) means 'no'; `fused_lora: on` (True) means 'on' — see switch_words."""
        if info.field_name is None or not isinstance(value, (bool, list)):
            return value
        annotation = cls.model_fields[info.field_name].annotation
        off, on = switch_words(annotation)
        if off is None and on is None:
            return value

        def word(item: Any) -> Any:
            if item is False and off is not None:
                return off
            if item is True and on is not None:
                return on
            return item

        if isinstance(value, list):
            return [word(item) for item in value]
        mapped = word(value)
        own, _ = choices(annotation)
        return [mapped] if mapped is not value and mapped not in own else mapped  # `report_to: no`
