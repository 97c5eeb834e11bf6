"""Shared base for every typed config: strict (unknown keys are errors), validated on assignment,
every field documented (``Field(description=...)``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict


class StrictModel(BaseModel):
    """A config section. Unknown keys raise; values are validated on construction and assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    def hash_fields(self) -> dict[str, Any]:
        """The fields that determine the artifact of the stage this config drives (JSON-able).

        By default every field. Sections override this to drop fields that cannot change the result
        (worker counts, progress bars, log intervals), so that changing them keeps the cache valid.
        """
        return self.model_dump(mode="json")


@dataclass(frozen=True)
class _Choices:
    """JSON-schema marker: the field's ``enum`` is the registry's names at the time the schema is made."""

    registry: Mapping[str, Any]

    def __get_pydantic_json_schema__(self, core_schema: Any, handler: Any) -> dict[str, Any]:
        schema = handler(core_schema)
        # An optional copy of the field (the stage forms' change sets) is `anyOf: [string, null]`: list the names
        # on the string branch, so null stays valid.
        for branch in schema.get("anyOf", [schema]):
            if branch.get("type") == "string":
                branch["enum"] = list(self.registry)
        return schema


def choices(registry: Mapping[str, Any]) -> _Choices:
    """Marker for ``Annotated[str, choices(REGISTRY)]``: the JSON schema lists the registry's names (a field that
    validates its value itself)."""
    return _Choices(registry)


def registered(registry: Mapping[str, Any], what: str) -> Any:
    """A ``str`` field type whose valid values are the keys of `registry` (read at validation time, so an entry
    registered after import is valid at once); the JSON schema (recipe forms) lists them as its ``enum``.
    An unknown value fails naming `what` and the registered names. This is how a config field follows an
    extension registry (data sources, label rules) without importing the code behind it."""

    def check(v: str | None) -> str | None:
        if v is not None and v not in registry:  # None: an optional copy of the field (flows.stages change sets)
            raise ValueError(f"unknown {what} {v!r}; registered: {', '.join(registry)}")
        return v

    return Annotated[str, AfterValidator(check), _Choices(registry)]
