"""Label rules of the verify stage: how a trace is decided correct, incorrect or unlabelled (``verify.label_rule``).

``LABEL_RULES`` is the one registry: each :class:`LabelRule` holds its function, a summary (the recipe field's
description and form list it) and the dataset label columns it reads (``needs``: a rule is refused before any
grading when one is missing or empty). ``VerifyConfig.label_rule`` accepts exactly the registered names. Adding a
rule is one ``register`` call here, plus its test.

A rule is ``fn(ours, df) -> Series`` of True / False / None per trace: ``ours`` is our own grade of the trace
(redi.grader.grade), ``df`` the light per-trace table (``label_math_verify``, ``label_llama``, ...). None means
neither positive nor negative. numpy and pandas are imported when a rule runs: the configs read the registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd


class LabelRuleError(ValueError):
    """The chosen label rule needs a column the data does not have."""


@dataclass(frozen=True)
class LabelRule:
    """One value of ``verify.label_rule``. Calling it checks ``needs`` and applies ``fn``."""

    name: str
    fn: Callable[[pd.Series, pd.DataFrame], pd.Series]
    summary: str
    needs: tuple[str, ...] = ()

    def __call__(self, ours: pd.Series, df: pd.DataFrame) -> pd.Series:
        for col in self.needs:
            _require(df, col, self.name)
        return self.fn(ours, df)


LABEL_RULES: dict[str, LabelRule] = {}
"""The registered label rules by name, in registration order."""


def register(rule: LabelRule) -> LabelRule:
    """Add (or replace) a label rule; ``verify.label_rule`` accepts its name from now on."""
    LABEL_RULES[rule.name] = rule
    return rule


def rule_math_verify(ours: pd.Series, df: pd.DataFrame) -> pd.Series:
    """MATH_VERIFY: our own grade (redi.grader.grade) of the trace's final answer against the gold."""
    return ours


def rule_dataset(ours: pd.Series, df: pd.DataFrame) -> pd.Series:
    """DATASET: the dataset's own Math-Verify label (correctness_math_verify / math_verify_reparsed_answer)."""
    return df["label_math_verify"].astype(object)


def _truthy(s: pd.Series) -> np.ndarray:
    """``bool(v)`` of each label, as the official scripts take it: a missing label (None, NaN, NA) is False."""
    import numpy as np

    known = s.notna().to_numpy()
    out = np.zeros(len(s), dtype=bool)
    out[known] = s[known].astype(bool).to_numpy()
    return out


def _verifiers(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    return _truthy(df["label_llama"]), _truthy(df["label_math_verify"])


def rule_landmv(ours: pd.Series, df: pd.DataFrame) -> pd.Series:
    """LANDMV, the paper's rule as the official code applies it: ``experiments_trl/data_preprocess/
    clean_base_shuffled_dpo.py`` (the pairs REDI trains on; "LandMV False means NOT (Llama True AND MathRep
    True)") and ``clean_base_shuffled.py`` (the SFT positives). True iff ``bool(llama) and bool(math_verify)``;
    every other trace is False: one verifier rejects it, or a label is missing (``bool(None)`` is False).
    App. C.2 says the same ("deemed incorrect by either"). Never None.

    Where a source row lacks a whole label list the official scripts skip the row; here its traces are all
    False, so the row has no correct trace and yields neither a positive nor a pair there either: the same
    selection (only the funnel's label counts see those traces)."""
    import pandas as pd

    llama, mv = _verifiers(df)
    return pd.Series(llama & mv, index=df.index, dtype=object)


def rule_landmv_both_wrong(ours: pd.Series, df: pd.DataFrame) -> pd.Series:
    """The verifier-signal ablation's labels (``experiments_trl/data_preprocess/ablation_verifier_signal.py``):
    True iff both verifiers say correct, False iff neither does (``not bool(l) and not bool(mr)``: a missing
    label counts as not-correct), None (neither positive nor negative) when exactly one says correct.
    Only the labels follow that script; its split of the pairs into normal and inverted halves, its balancing
    and its length rule (responses only, no chat template) are not reproduced."""
    import numpy as np
    import pandas as pd

    llama, mv = _verifiers(df)
    out = np.full(len(df), None, dtype=object)
    out[llama & mv] = True
    out[~llama & ~mv] = False
    return pd.Series(out, index=df.index, dtype=object)


def _require(df: pd.DataFrame, col: str, rule: str) -> None:
    if col not in df or df[col].isna().all():
        raise LabelRuleError(f"label_rule={rule!r} needs the dataset column {col!r}, which is missing or empty in these traces "
                             "(the synthetic source and OpenR1 sets have it; use label_rule=math_verify otherwise)")


_BOTH = ("label_llama", "label_math_verify")
register(LabelRule("math_verify", rule_math_verify, "our own grading (redi.grader.grade)"))
register(LabelRule("dataset", rule_dataset, "the dataset's Math-Verify label", needs=("label_math_verify",)))
register(LabelRule("landmv", rule_landmv, "the paper's rule (official clean_base_shuffled_dpo.py): correct iff the Llama "
                   "judge AND Math-Verify say correct, every other trace incorrect", needs=_BOTH))
register(LabelRule("landmv_both_wrong", rule_landmv_both_wrong, "the verifier-signal ablation (ablation_verifier_signal.py): "
                   "incorrect only if neither says correct, a disagreement unlabelled", needs=_BOTH))
