"""Config of the ``download`` stage: where the teacher traces come from."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..sources import SOURCES, get_source, source_fields
from .base import StrictModel, registered
from .teacher import GenerateConfig


class SynthConfig(StrictModel):
    """The offline synthetic teacher (``redi.synth``): Open-R1-schema rows with exactly-known answers."""

    n_train: int = Field(4000, ge=1, description="Training problems (each with `traces_per_problem` teacher traces).")
    n_val: int = Field(100, ge=0, description="Held-out validation problems (for hyper-parameter search; no traces).")
    n_test: int = Field(200, ge=0, description="Held-out test problems (the `demo_test` benchmark; no traces).")
    traces_per_problem: int = Field(4, ge=1, le=64, description="Teacher generations per training problem.")
    error_rate: float = Field(0.35, ge=0.0, le=1.0, description="Share of traces that are wrong (slip, misconception, wrong last step, sign error, truncation; shares in redi.synth.ERROR_WEIGHTS).")
    min_steps: int = Field(2, ge=1, le=8, description="Fewest reasoning steps in a problem.")
    max_steps: int = Field(4, ge=1, le=8, description="Most reasoning steps in a problem.")
    max_value: int = Field(99, ge=10, le=100000, description="Largest intermediate value a problem may reach.")
    algebra_share: float = Field(0.2, ge=0.0, le=1.0, description="Share of problems that are linear equations (a x + b = c) instead of word problems.")
    equiv_form_rate: float = Field(0.1, ge=0.0, le=1.0, description="Share of correct traces whose boxed answer is in another but equivalent form (\\frac{84}{2}, 42.0, x = 42).")
    judge_noise: float = Field(0.03, ge=0.0, le=0.5, description="Probability that the simulated Llama-judge label (correctness_llama) disagrees with the truth.")
    seed: int = Field(0, description="Seed of the generator: the same seed gives byte-identical data.")
    style: Literal["terse", "realistic"] = Field(
        "terse", description="`terse`: one fixed line per step (a negative shares ~95 % of its characters with a positive); "
        "`realistic`: varied wording, strategies, detours, early errors (redi.synth_realistic; the same problems for a seed).")

    @model_validator(mode="after")
    def _steps(self) -> SynthConfig:
        if self.min_steps > self.max_steps:
            raise ValueError(f"synth.min_steps ({self.min_steps}) > synth.max_steps ({self.max_steps})")
        return self


class DataConfig(StrictModel):
    """Stage ``download`` of the DAG (redi.dag.NODES). Normalises any source into one row per (problem, generation)."""

    source: registered(SOURCES, "data source") = Field(  # type: ignore[valid-type]  # a name of redi.sources.SOURCES
        "synthetic", description="Where the traces come from (registered in redi.sources.SOURCES): "
        + "; ".join(f"`{s.name}`: {s.summary}" for s in SOURCES.values()) + "."
    )
    hub_id: str = Field("open-r1/OpenR1-Math-220k", description="Hub dataset id (`open-r1/OpenR1-Math-220k` or `open-r1/OpenR1-Math-Raw`, the paper's).")
    hub_config: str | None = Field("default", description="Hub dataset config (`default`, `extended`, `all` for OpenR1-Math-220k).")
    hub_split: str = Field("train", description="Split to load (source=hub; source=local: the split of a `datasets` save_to_disk folder).")
    revision: str | None = Field(None, description="Pinned Hub revision (commit sha); recorded in the manifest. None = the Hub's main, resolved and recorded at download time.")
    local_path: str | None = Field(None, description="A parquet/jsonl file, a folder of them, or a `datasets` save_to_disk folder (source=local).")
    schema_: Literal["auto", "openr1-220k", "openr1-raw", "flat"] = Field(
        "auto", alias="schema", description="Input schema; `auto` detects it from the columns."
    )
    max_rows: int | None = Field(None, ge=1, description="Stop after this many source rows (problems); None = all.")
    synth: SynthConfig = Field(default_factory=SynthConfig, description="Synthetic teacher settings (source=synthetic).")
    generate: GenerateConfig = Field(default_factory=GenerateConfig, description="Traces sampled from a model and graded (source=generate, redi.teacher): model, problems, n, sampling, backend.")

    model_config = StrictModel.model_config | {"populate_by_name": True}

    @model_validator(mode="after")
    def _source(self) -> DataConfig:
        for f in get_source(self.source).requires:  # a dotted name reads a nested section's field
            value: object = self
            for part in f.split("."):
                value = getattr(value, part)
            if value in (None, ""):
                raise ValueError(f"data.{f} is required when data.source is {self.source!r}")
        return self

    def hash_fields(self) -> dict:
        """Fields that only other sources read (``redi.sources.DataSource.fields``) are left out."""
        d = self.model_dump(mode="json", by_alias=True)
        for f in source_fields() - set(get_source(self.source).fields):
            d.pop(f)
        if "generate" in d:
            d["generate"] = self.generate.hash_fields()
            if self.generate.problems != "synthetic":
                d.pop("synth", None)  # the generate source reads data.synth only for the synthetic problems
        if "synth" in d and self.synth.style == "terse":
            d["synth"].pop("style")  # terse keys stay those of recipes written before synth.style existed
        return d
