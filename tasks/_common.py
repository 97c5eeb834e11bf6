"""What every stage task shares: rebuild the Pipeline from the recipe dict, scoped to one stage."""

from __future__ import annotations

from typing import Any

from redi.artifacts import Artifact
from redi.config import Recipe
from redi.pipeline import Pipeline


def pipeline_for(recipe: dict[str, Any], stage: str) -> Pipeline:
    """A Pipeline whose ``run.refresh`` keeps only ``stage``.

    Each task builds its own Pipeline, and some stages look up their upstream internally (evaluate
    reads the download artifact's held-out splits). A refresh of ``download`` must rebuild download
    once, in the download task, not again inside every evaluate task; keys do not depend on
    ``run.refresh``, so scoping it changes nothing else.
    """
    r = Recipe.model_validate(recipe)
    r.run.refresh = [s for s in r.run.refresh if s == stage]
    return Pipeline(r)


def art(d: dict[str, Any] | None) -> Artifact | None:
    return Artifact.from_dict(d) if d is not None else None
