"""redi.signals plots: smoothing on literal values, where the collapse warning is marked."""

from __future__ import annotations

import math

import pytest

from redi.signals import SignalLog, collapse_onsets, collapsed_spans, smooth, smoothing_window


def test_smooth_is_a_debiased_ema_that_skips_nans():
    # window 3 -> alpha 0.5; debiased: step 1 is the value itself, step 2 = (0.5*0.5*2 + 0.5*4) / 0.75
    out = smooth([2.0, 4.0, float("nan"), 4.0], 3)
    assert out[0] == 2.0 and out[1] == pytest.approx(10 / 3) and math.isnan(out[2])
    assert out[3] == pytest.approx((0.125 * 2 + 0.25 * 4 + 0.5 * 4) / 0.875)  # weights 1/8, 1/4, 1/2
    assert smooth([1.0, 5.0], 1) == [1.0, 5.0]  # window 1: the raw values
    assert (smoothing_window(5), smoothing_window(200), smoothing_window(10_000)) == (1, 20, 50)


def test_collapse_onsets_and_spans():
    recs = [{"step": i + 1, "collapsed": c} for i, c in enumerate([False, True, True, False, True, False])]
    assert collapse_onsets(recs) == [2, 5] and collapsed_spans(recs) == [(2, 3), (5, 5)]
    assert collapse_onsets([]) == [] and collapsed_spans([{"step": 1, "collapsed": False}]) == []


def _log(chosen: list[float]) -> SignalLog:
    s = SignalLog(collapse_threshold=-0.3)
    for i, c in enumerate(chosen):
        s.add({"step": i + 1, "loss": 1.0 / (i + 1), "chosen_logp": c, "rejected_logp": c - 0.5, "margin": 0.5,
               "grad_norm": 1.0, "update_norm": 1e-3, "lr": 1e-5, "tokens_per_s": 100.0})
    return s


def test_plot_marks_the_collapse_and_draws_raw_values_faint(tmp_path):
    import matplotlib.pyplot as plt

    s = _log([-0.105 - 0.01 * i for i in range(60)])  # below -0.3 from step 21 (-0.305)
    fig = s.figure("t")
    ax = fig.axes[1]  # the log-prob panel
    labels = [line.get_label() for line in ax.get_lines()]
    assert "collapse warning (step 21)" in labels and "collapse threshold" in labels
    faint = [line for line in fig.axes[0].get_lines() if line.get_alpha() == 0.25]
    assert len(faint) == 1 and len(faint[0].get_xdata()) == 60  # raw loss under its smoothed line
    assert any("collapse warning, step 21" in t.get_text() for t in ax.texts)
    plt.close(fig)
    quiet = _log([-0.1] * 60).figure("q")
    assert not any("collapse warning" in line.get_label() for ax in quiet.axes for line in ax.get_lines())
    plt.close(quiet)
    s.plot(tmp_path / "s.png", "t")
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
