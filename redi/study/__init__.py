"""The CPU-scale study: from one SFT checkpoint at its validation plateau, does REDI beat
continued SFT, DPO and SimPO?

Built on :class:`redi.pipeline.Pipeline` and the stage entry points, never around them:

1. ``download`` / ``model`` / ``verify`` come from the Pipeline (same keys as ``redi run``).
2. **SFT to plateau.** SFT runs in rounds of ``study.sft_round_epochs`` through ``redi.train.train_sft``;
   round 1 starts from the base model (its artifact *is* the Pipeline's ``sft`` artifact when
   ``sft.epochs`` equals the round length), round r from round r-1's model folder. Each round is its
   own ``sft`` artifact keyed on the previous round's key. After each round the model is evaluated on
   the validation split (``demo_val``); :func:`plateau_decision` stops when ``patience`` rounds in a
   row fail to beat the best round by more than noise. The best round is the stage-2 start.
3. **Search on validation.** Every method's grid (lr, and alpha / beta / gamma where they apply) is
   trained from that checkpoint with ``study.search_seed`` and scored on ``demo_val``. The best point
   by validation pass@1 is the method's setting; the test split is never looked at here.
4. **Final runs on test.** Each final method at its chosen setting, over ``study.seeds``, evaluated on
   ``demo_test`` with ``study.test_n_samples`` (16) samples per problem. The search's seed-0 model is
   the same artifact as the final seed-0 model (same key), so it trains once.
5. **Report.** Table 2-style results (mean pass@1 +- SEM over seeds, pass@16), the search table, the
   SFT curve, training-signal plots per method and where the collapse signal fired.

Every trained model is a ``sft`` or ``redi`` artifact and every evaluation an ``evaluate`` artifact of
the Pipeline's store, keyed by (config fields, upstream artifact keys, code version): a change to one
method's grid or to the DPO loss reruns only the points it determines.

Departures from the paper, all forced by scale and stated in docs/study.md:
- "none" (the paper's SFT-only row) is SFT continued from the same checkpoint for the same number of
  optimiser steps as stage 2, with stage 2's batch size and schedule, on the positive traces.
- SFT rounds restart the optimiser and the lr schedule (warm restarts): the trainer has no
  "continue from checkpoint with optimiser state" entry point; the round seed advances so each round
  sees a fresh shuffle.
- Stage-2 hyper-parameters are searched per method on validation (the paper reports tuned settings).

Modules: ``config`` (methods, ``study.yaml``), ``logic`` (plateau, selection, seed statistics, collapse;
no I/O), ``results`` (records), ``runner`` (:class:`Study`), ``parallel`` (points in child processes),
``report`` (tables and plots).
"""

from .config import CONTINUED_SFT, MethodSpec, PointJob, StudyConfig, load_study, method_fields
from .logic import (
    PlateauDecision,
    choose,
    collapse_check,
    param_str,
    plateau_decision,
    seed_stats,
    select_best,
    sft_summary,
    standard_error,
)
from .report import final_table, markdown_table, write_report
from .results import SIGNAL_FIELDS, EvalResult, PointResult, StudyResult, build_seconds, read_signals
from .runner import Study, main, run_study

__all__ = [
    "CONTINUED_SFT", "SIGNAL_FIELDS", "EvalResult", "MethodSpec", "PlateauDecision", "PointJob", "PointResult", "Study", "StudyConfig",
    "StudyResult", "build_seconds", "choose", "collapse_check", "final_table", "load_study", "main", "markdown_table",
    "method_fields", "param_str", "plateau_decision", "read_signals", "run_study", "seed_stats", "select_best", "sft_summary",
    "standard_error", "write_report",
]
