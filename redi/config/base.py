"""Shared base for every typed config: strict (unknown keys are errors), validated on assignment,
every field documented (``Field(description=...)``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """A config section. Unknown keys raise; values are validated on construction and assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    def hash_fields(self) -> dict[str, Any]:
        """The fields that determine the artifact of the stage this config drives (JSON-able).

        By default every field. Sections override this to drop fields that cannot change the result
        (worker counts, progress bars, log intervals), so that changing them keeps the cache valid.
        """
        return self.model_dump(mode="json")
