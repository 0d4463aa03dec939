"""Divergence statistics on synthetic series whose answers are known by construction."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis import divergence as dv
from analysis.divergence import (
    CORRELATION_COLUMNS,
    MATCHED_COLUMNS,
    RANKING_COLUMNS,
    RESIDUAL_COLUMNS,
    WINDOW_COLUMNS,
    align,
    correlations,
    divergence_windows,
    isotonic_fit,
    matched_loss,
    pava,
    predictor_ranking,
    rankdata,
    residuals,
    spearman,
)
from analysis.divergence.ranking import _loo_errors
from analysis.divergence.windows import _windows_of_run

LOSS, ACC = "train/loss", "arc_easy/acc,none"
CKPTS = np.arange(250, 5001, 250)  # 20 checkpoints


def series(run: str, steps, metric: str, values, stderr=None, tokens_per_step: int = 1000) -> pd.DataFrame:
    steps = np.asarray(steps)
    return pd.DataFrame(
        {
            "run": run,
            "step": steps,
            "tokens": steps * tokens_per_step,
            "metric": metric,
            "value": np.asarray(values, dtype=float),
            "stderr": np.nan if stderr is None else stderr,
        }
    )


def grokking_frame(noise: float = 0.0) -> pd.DataFrame:
    """Loss falls to 2.0 by step 1000, stays flat to 3000, falls again; accuracy rises 0.1 -> 0.9 in 1000..3000."""
    dense = np.arange(10, 5001, 10)
    loss = np.interp(dense, [0, 1000, 3000, 5000], [4.0, 2.0, 2.0, 1.0])
    acc = np.interp(CKPTS, [0, 1000, 3000, 5000], [0.1, 0.1, 0.9, 0.9])
    acc = acc + noise * np.random.default_rng(3).standard_normal(len(CKPTS))
    return pd.concat([series("a", dense, LOSS, loss), series("a", CKPTS, ACC, acc, 0.02)], ignore_index=True)


def inverse_frame() -> pd.DataFrame:
    """Loss falls all along; accuracy rises to 0.6 at step 1000, falls to 0.3 at 3000, then recovers."""
    loss = 5.0 * (CKPTS / 250) ** -0.5
    acc = np.interp(CKPTS, [0, 1000, 3000, 5000], [0.3, 0.6, 0.3, 0.7])
    return pd.concat([series("b", CKPTS, LOSS, loss), series("b", CKPTS, ACC, acc, 0.02)], ignore_index=True)


# -- align --------------------------------------------------------------------------------------------------


def test_align_interpolates_on_log_x_without_extrapolating():
    frame = pd.concat(
        [series("r", [100, 1000], LOSS, [1.0, 2.0]), series("r", [50, 100, np.sqrt(1e5), 1000, 2000], ACC, [9] * 5)]
    )
    out = align(frame, LOSS, ACC)
    assert out["x"].tolist() == pytest.approx([100, np.sqrt(1e5), 1000])  # 50 and 2000 lie outside the loss
    assert out["left"].tolist() == pytest.approx([1.0, 1.5, 2.0])  # halfway on log-x
    linear = align(frame, LOSS, ACC, log_interp=False)
    assert linear["left"].iloc[1] == pytest.approx(1.0 + (np.sqrt(1e5) - 100) / 900)


def test_align_on_tokens_and_flops():
    frame = pd.concat([series("r", [1, 2, 4], LOSS, [3, 2, 1]), series("r", [2, 4], ACC, [0.2, 0.4])])
    tokens = align(frame, LOSS, ACC, x="tokens")
    assert tokens["x"].tolist() == [2000, 4000]
    flops = align(frame, LOSS, ACC, x="flops", n_params=10)
    assert flops["x"].tolist() == [6 * 10 * 2000, 6 * 10 * 4000]
    assert flops["step"].tolist() == [2, 4]
    per_run = align(frame, LOSS, ACC, x="flops", n_params={"r": 5})
    assert per_run["x"].tolist() == [6 * 5 * 2000, 6 * 5 * 4000]
    with pytest.raises(ValueError, match="n_params"):
        align(frame, LOSS, ACC, x="flops")
    with pytest.raises(ValueError, match="no entry for run 'r'"):
        align(frame, LOSS, ACC, x="flops", n_params={"other": 5})


def test_a_log_repeating_a_step_keeps_its_mean_and_nans_are_dropped():
    frame = pd.concat(
        [
            series("r", [1, 2, 3], LOSS, [3.0, np.nan, 1.0]),
            series("r", [1, 2, 2, 3], ACC, [0.1, 0.2, 0.4, np.nan]),
        ]
    )
    out = align(frame, LOSS, ACC, log_interp=False)
    assert out["x"].tolist() == [1, 2]
    assert out["right"].tolist() == pytest.approx([0.1, 0.3])
    assert out["left"].tolist() == pytest.approx([3.0, 2.0])  # the NaN loss at step 2 is interpolated over


# -- correlations -------------------------------------------------------------------------------------------


def test_rankdata_averages_ties():
    assert rankdata([10, 20, 20, 30]).tolist() == [1, 2.5, 2.5, 4]
    assert rankdata([3, 1, 3, 3]).tolist() == [3, 1, 3, 3]


def test_spearman_matches_hand_computation():
    # No ties: 1 - 6 * sum(d^2) / (n (n^2 - 1)) with d = [-1, 1, -1, 1, 0].
    assert spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(1 - 6 * 4 / (5 * 24))
    # Ties: ranks [1, 2.5, 2.5, 4] vs [1, 2, 3, 4] -> cov 4.5 / sqrt(4.5 * 5).
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(3 / np.sqrt(10))
    assert spearman([5, 4, 3], [1, 10, 100]) == pytest.approx(-1.0)
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_two_settings_of_one_metric_are_never_averaged():
    """A Hessian trace over all parameters and one over layer 0 are two series, not one averaged curve."""
    steps = [100, 200, 300, 400, 500]
    whole = series("r", steps, "hessian_trace", [50, 40, 30, 20, 10]).assign(params_hash="all")
    layer = series("r", steps, "hessian_trace", [1, 3, 2, 5, 4]).assign(params_hash="layer0")
    score = series("r", steps, ACC, [0.1, 0.2, 0.3, 0.4, 0.5], 0.01).assign(params_hash="s")
    with pytest.raises(ValueError, match=r"'hessian_trace' of run 'r' has 2 settings.*pick one") as info:
        align(pd.concat([whole, layer, score]), "hessian_trace", ACC)
    assert "\n" not in str(info.value)
    for part, want in ((whole, [50, 40, 30, 20, 10]), (layer, [1, 3, 2, 5, 4])):
        out = align(pd.concat([part, score]), "hessian_trace", ACC)
        assert out["left"].tolist() == want  # exactly one setting's values
    ranking = predictor_ranking(pd.concat([whole, score]), ACC, candidates=["hessian_trace"])
    assert ranking.iloc[0]["spearman"] == pytest.approx(-1.0)


def test_unconverged_estimates_are_left_out_unless_asked_for():
    steps = [100, 200, 300]
    eig = series("r", steps, "hessian_top_eigenvalue", [3.0, 0.001, 5.0]).assign(converged=[True, False, None])
    score = series("r", steps, ACC, [0.1, 0.2, 0.3], 0.01)
    assert align(pd.concat([eig, score]), "hessian_top_eigenvalue", ACC, log_interp=False)["left"].tolist() == [
        3.0,
        4.0,  # step 200 interpolated between the converged neighbours, never the unconverged 0.001
        5.0,
    ]
    kept = align(pd.concat([eig, score]), "hessian_top_eigenvalue", ACC, include_unconverged=True)
    assert kept["left"].tolist() == [3.0, 0.001, 5.0]


def test_correlations_describe_levels_and_test_changes():
    frame = inverse_frame()
    out = correlations(frame, LOSS, [ACC])
    assert list(out.columns) == CORRELATION_COLUMNS
    row = out.iloc[0]
    assert row["n"] == len(CKPTS)
    assert row["change_lo"] <= row["change_spearman"] <= row["change_hi"]
    assert 0 < row["n_effective"] <= len(CKPTS) - 1
    # Inside the inverse window loss and accuracy fall together: perfect positive rank correlation.
    inside = correlations(frame, LOSS, ACC, window=(1000, 3000))
    assert inside.iloc[0]["n"] == 9
    assert inside.iloc[0]["spearman"] == pytest.approx(1.0)
    # The aligned frame gives the same answer as the long table.
    pd.testing.assert_frame_equal(out, correlations(align(frame, LOSS, ACC), LOSS, ACC))
    # By hand: Spearman of the first differences, Fisher-z interval on 1.06 / (n_eff - 3).
    a = align(frame, LOSS, ACC)
    da, db = np.diff(a["left"]), np.diff(a["right"])
    assert row["change_spearman"] == pytest.approx(spearman(da, db))
    half = 1.959964 * np.sqrt(1.06 / (row["n_effective"] - 3))
    z = np.arctanh(row["change_spearman"])
    assert (row["change_lo"], row["change_hi"]) == pytest.approx((np.tanh(z - half), np.tanh(z + half)), abs=1e-6)


def test_correlations_too_few_points_and_nans():
    frame = pd.concat([series("r", [1, 2, 3], LOSS, [3, 2, 1]), series("r", [1, 2], ACC, [0.1, 0.2])])
    out = correlations(frame, LOSS, ACC)
    assert out.empty and list(out.columns) == CORRELATION_COLUMNS
    clean = inverse_frame()
    dirty = pd.concat([clean, series("b", [333, 444], ACC, [np.nan, np.nan]), series("b", [250], LOSS, [np.nan])])
    pd.testing.assert_frame_equal(correlations(clean, LOSS, ACC), correlations(dirty, LOSS, ACC))


# -- divergence windows -------------------------------------------------------------------------------------


def test_planted_grokking_window_found_with_its_bounds():
    out = divergence_windows(grokking_frame(), LOSS, ACC)
    assert list(out.columns) == WINDOW_COLUMNS
    assert len(out) == 1
    w = out.iloc[0]
    assert (w["run"], w["kind"], w["start"], w["end"]) == ("a", "grokking", 1000, 3000)
    assert w["downstream_change"] == pytest.approx(0.8)
    assert w["loss_change"] == pytest.approx(0.0)
    assert w["z_score"] == pytest.approx(0.8 / np.sqrt(2 * 0.02**2))
    assert w["n_points"] == 9 and w["p_adjusted"] < 0.001 and w["stderr_source"] == "reported"
    assert 0 < w["change_lo"] < 0.8 < w["change_hi"]
    assert w["change_hi"] - 0.8 == pytest.approx(0.8 - w["change_lo"])


def test_grokking_window_survives_noise_and_needs_flat_loss():
    out = divergence_windows(grokking_frame(noise=0.01), LOSS, ACC)
    assert out["kind"].tolist() == ["grokking"]
    assert out.iloc[0]["start"] in (1000, 1250) and out.iloc[0]["end"] in (2750, 3000)
    # A tolerance too small for the flat stretch's numerical jitter still sees it (it is exactly flat) ...
    assert len(divergence_windows(grokking_frame(), LOSS, ACC, loss_tol=1e-9)) == 1
    # ... but a loss that falls 5% per checkpoint is never flat at 2%.
    frame = grokking_frame()
    frame.loc[frame["metric"] == LOSS, "value"] = 4.0 * 0.95 ** (frame.loc[frame["metric"] == LOSS, "step"] / 250)
    assert (divergence_windows(frame, LOSS, ACC)["kind"] != "grokking").all()
    # Larger stderr: the same rise is no longer significant.
    frame = grokking_frame()
    frame.loc[frame["metric"] == ACC, "stderr"] = 0.5
    assert divergence_windows(frame, LOSS, ACC).empty


def test_absolute_tolerance():
    frame = grokking_frame()
    mask = (frame["metric"] == LOSS) & frame["step"].between(1000, 3000)
    frame.loc[mask, "value"] = 2.0 + 0.03 * (-1.0) ** (frame.loc[mask, "step"] // 250)  # +-0.03 by checkpoint
    assert (divergence_windows(frame, LOSS, ACC, loss_tol=0.01, tol_of="absolute")["kind"] != "grokking").all()
    found = divergence_windows(frame, LOSS, ACC, loss_tol=0.07, tol_of="absolute")
    assert found[["start", "end"]].values.tolist() == [[1000, 3000]]


def _fitted_run(n: int, rng: np.random.Generator, rise: float) -> tuple[np.ndarray, np.ndarray]:
    """A training loss that fits (4.6 -> ~0.01 by a fifth of the run), then wobbles 30% around its floor, as
    a logged batch loss does; accuracy (stderr 0.02) flat at 0.01 plus noise, or rising by ``rise`` over the
    last half."""
    x = np.arange(1, n + 1, dtype=float)
    loss = np.maximum(0.01, 4.6 * np.exp(-x / (n / 25))) * (1 + 0.3 * rng.uniform(-1, 1, n))
    acc = 0.01 + rise * np.clip((np.arange(n) - n / 2) / (n / 2), 0, 1) + 0.02 * rng.standard_normal(n)
    return loss, acc


def _grokking_found(loss: np.ndarray, acc: np.ndarray, tol_of: str, seed: int) -> bool:
    """The per-run window search of divergence_windows on arrays (skips the frame plumbing: fast enough to simulate)."""
    found, _ = _windows_of_run(
        np.arange(len(loss), dtype=float), loss, acc, np.full(len(acc), 0.02), loss_sign=-1.0, score_sign=1.0,
        loss_tol=0.1, tol_of=tol_of, alpha=0.05, min_points=2, n_sim=500, seed=seed,
    )  # fmt: skip
    return any(w["kind"] == "grokking" for w in found)


@pytest.mark.parametrize("n", [3, 5, 20, 100])
@pytest.mark.slow
def test_range_tolerance_keeps_the_error_rate_on_a_fitted_loss(n):
    """Null: a loss at its noisy floor is flat by its range, and pure-noise accuracy gets a grokking window in
    at most alpha of runs (95% binomial bound over 100 runs). The candidate spans depend on the loss only, so
    the max-T calibration holds for any such rule; ``python -m bench.calibration`` covers 150-300 checkpoints."""
    rng = np.random.default_rng(n)
    runs = 100
    hits = sum(_grokking_found(*_fitted_run(n, rng, 0.0), "range", seed=i) for i in range(runs))
    assert hits / runs <= 0.05 + 1.96 * np.sqrt(0.05 * 0.95 / runs)


@pytest.mark.parametrize("n", [10, 20, 100])
def test_range_tolerance_finds_a_late_rise_at_a_fitted_loss(n):
    """Power: accuracy rising by 0.5 over the second half, the loss at its floor, is found in nearly every run;
    measured relative to the loss's own (tiny, wobbling) value, the flat stretch is rarely flat, and the rise
    is found far less often."""
    rng = np.random.default_rng(100 + n)
    planted = [_fitted_run(n, rng, 0.5) for _ in range(30)]
    by_range = sum(_grokking_found(loss, acc, "range", seed=i) for i, (loss, acc) in enumerate(planted))
    by_value = sum(_grokking_found(loss, acc, "value", seed=i) for i, (loss, acc) in enumerate(planted))
    assert by_range >= 27 and by_value < by_range


def test_tolerance_modes_by_hand():
    loss = np.array([4.0, 1.0, 0.02, 0.01])
    assert dv.flat_tolerance(loss, 0.1, "value").tolist() == pytest.approx([0.4, 0.1, 0.002, 0.001])
    assert dv.flat_tolerance(loss, 0.1, "range").tolist() == pytest.approx([0.399] * 4)
    assert dv.flat_tolerance(loss, 0.1, "absolute").tolist() == [0.1] * 4
    with pytest.raises(ValueError, match="tol_of='ratio': use one of value, range, absolute"):
        divergence_windows(grokking_frame(), LOSS, ACC, tol_of="ratio")


def test_planted_inverse_window_found_with_its_bounds():
    out = divergence_windows(inverse_frame(), LOSS, ACC)
    assert len(out) == 1
    w = out.iloc[0]
    assert (w["kind"], w["start"], w["end"]) == ("inverse", 1000, 3000)
    assert w["downstream_change"] == pytest.approx(-0.3)
    assert w["loss_change"] < 0
    assert w["z_score"] == pytest.approx(0.3 / np.sqrt(2 * 0.02**2))  # oriented: positive = the claimed move
    assert w["change_hi"] < 0


def test_logged_score_without_stderr_gets_its_noise_from_the_series():
    """Logged accuracy has no stderr: jitter on a flat loss is no move; the planted rise is."""
    rng = np.random.default_rng(7)
    steps = np.arange(100, 5001, 100)  # 50 logged points
    loss = np.interp(steps, [0, 1000, 5000], [4.0, 2.0, 2.0])  # flat from 1000 on
    acc = np.interp(steps, [0, 3000, 3500, 5000], [0.01, 0.01, 0.9, 0.9]) + 0.01 * rng.standard_normal(len(steps))
    frame = pd.concat([series("log", steps, LOSS, loss), series("log", steps, ACC, acc)], ignore_index=True)
    found = divergence_windows(frame, LOSS, ACC)
    assert len(found) == 1 and found.iloc[0]["kind"] == "grokking"
    assert 2500 <= found.iloc[0]["start"] <= 3100 and 3400 <= found.iloc[0]["end"] <= 3700
    assert found.iloc[0]["stderr_source"] == "scatter" and np.isfinite(found.iloc[0]["z_score"])
    # The estimate recovers the planted jitter: sigma 0.01.
    assert dv.scatter_stderr(acc) == pytest.approx(0.01, rel=0.35)
    assert dv.scatter_stderr(np.array([0.5, 0.5])) == 0.0


def test_windows_without_stderr_and_too_few_points():
    frame = grokking_frame(noise=0.01)
    frame["stderr"] = np.nan
    out = divergence_windows(frame, LOSS, ACC)
    assert out["kind"].tolist() == ["grokking"] and out.iloc[0]["stderr_source"] == "scatter"
    exact = grokking_frame()  # no stderr and no jitter at all: nothing to measure noise by, nothing claimed
    exact["stderr"] = np.nan
    assert divergence_windows(exact, LOSS, ACC).empty
    tiny = pd.concat([series("r", [1, 2], LOSS, [1, 1]), series("r", [1], ACC, [0.5], 0.01)])
    empty = divergence_windows(tiny, LOSS, ACC)
    assert empty.empty and list(empty.columns) == WINDOW_COLUMNS


# -- matched loss -------------------------------------------------------------------------------------------


def two_runs_frame() -> pd.DataFrame:
    """Run 'slow' reaches each loss at twice the steps of 'fast'; at equal loss it scores 0.05 higher."""
    loss_fast = 5.0 * (CKPTS / 250) ** -0.5
    loss_slow = 5.0 * (CKPTS / 500) ** -0.5
    return pd.concat(
        [
            series("fast", CKPTS, LOSS, loss_fast),
            series("fast", CKPTS, ACC, 1.0 - 0.2 * loss_fast, 0.02),
            series("slow", CKPTS, LOSS, loss_slow),
            series("slow", CKPTS, ACC, 1.05 - 0.2 * loss_slow, 0.03),
        ],
        ignore_index=True,
    )


def test_matched_loss_recovers_planted_gap():
    out = matched_loss(two_runs_frame(), LOSS, ACC, ["fast", "slow"], levels=5)
    assert list(out.columns) == MATCHED_COLUMNS
    assert len(out) == 10
    levels = out["loss_level"].unique()
    # The common range: from the highest loss both reached (fast's first) to the lowest both reached (slow's last).
    assert levels.max() == pytest.approx(5.0)
    assert levels.min() == pytest.approx(5.0 * (5000 / 500) ** -0.5)
    assert np.all(np.diff(levels) < 0)
    slow = out[out["run"] == "slow"]
    assert slow["gap"].to_numpy() == pytest.approx(np.full(5, 0.05))
    assert slow["gap_stderr"].to_numpy() == pytest.approx(np.full(5, np.hypot(0.02, 0.03)))
    fast = out[out["run"] == "fast"]
    assert (fast["gap"] == 0).all() and (fast["reference"] == "fast").all()
    assert fast["downstream"].to_numpy() == pytest.approx(1.0 - 0.2 * levels)
    # The other run as reference flips the sign.
    flipped = matched_loss(two_runs_frame(), LOSS, ACC, ["slow", "fast"], levels=[2.0, 1.6])
    assert flipped[flipped["run"] == "fast"]["gap"].to_numpy() == pytest.approx([-0.05, -0.05])


def test_matched_loss_ignores_loss_spikes():
    frame = pd.concat(
        [
            series("r", [1, 2, 3, 4], LOSS, [3.0, 2.5, 2.8, 2.0]),
            series("r", [1, 2, 3, 4], ACC, [0.1, 0.2, 0.0, 0.4], 0.01),
        ]
    )
    out = matched_loss(frame, LOSS, ACC, ["r"], levels=[2.25])
    assert out["downstream"].tolist() == pytest.approx([0.3])  # between (2.5, 0.2) and (2.0, 0.4), not the spike


def test_matched_loss_errors_and_empty():
    frame = two_runs_frame()
    with pytest.raises(ValueError, match="run 'nope' not in the data; available: fast, slow"):
        matched_loss(frame, LOSS, ACC, ["fast", "nope"])
    with pytest.raises(ValueError, match="outside the common loss range"):
        matched_loss(frame, LOSS, ACC, ["fast", "slow"], levels=[10.0])
    # No common loss range: one run stays above the other's whole range.
    apart = frame.copy()
    apart.loc[(apart["run"] == "slow") & (apart["metric"] == LOSS), "value"] += 100
    out = matched_loss(apart, LOSS, ACC, ["fast", "slow"])
    assert out.empty and list(out.columns) == MATCHED_COLUMNS


# -- residuals ----------------------------------------------------------------------------------------------


def test_residuals_pooled_and_per_run():
    loss = np.array([3.0, 2.5, 2.0, 1.5])
    frame = pd.concat(
        [
            series("a", [1, 2, 3, 4], LOSS, loss),
            series("a", [1, 2, 3, 4], ACC, 1.0 - 0.2 * loss),
            series("b", [1, 2, 3, 4], LOSS, loss),
            series("b", [1, 2, 3, 4], ACC, 1.1 - 0.2 * loss),
        ]
    )
    out = residuals(frame, LOSS, ACC)
    assert list(out.columns) == RESIDUAL_COLUMNS
    assert out["slope"].iloc[0] == pytest.approx(-0.2)
    assert out["intercept"].iloc[0] == pytest.approx(1.05)
    assert out.groupby("run")["residual"].mean().to_dict() == pytest.approx({"a": -0.05, "b": 0.05})
    assert out["run_residual"].abs().max() == pytest.approx(0.0, abs=1e-12)
    assert out.groupby("run")["run_intercept"].first().to_dict() == pytest.approx({"a": 1.0, "b": 1.1})
    flat = pd.concat([series("a", [1, 2], LOSS, [1, 1]), series("a", [1, 2], ACC, [0.1, 0.2])])
    assert residuals(flat, LOSS, ACC).empty


# -- isotonic fit and predictor ranking ---------------------------------------------------------------------


def test_pava_and_isotonic_fit_hand_examples():
    assert pava([1, 3, 2, 4]).tolist() == [1, 2.5, 2.5, 4]
    assert pava([3, 2, 1]).tolist() == [2, 2, 2]
    assert pava([2, 1], [3, 1]).tolist() == [1.75, 1.75]
    assert pava([1, 2, 3]).tolist() == [1, 2, 3]
    ux, fit = isotonic_fit([3, 1, 2], [2, 1, 3], increasing=False)  # sorted by x: y = [1, 3, 2]
    assert ux.tolist() == [1, 2, 3] and fit.tolist() == [2, 2, 2]
    ux, fit = isotonic_fit([1, 1, 2], [0, 2, 0])  # tied x averaged first (1 with weight 2), then pooled
    assert ux.tolist() == [1, 2] and fit.tolist() == pytest.approx([2 / 3, 2 / 3])


def ranking_frame() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    pieces = []
    for k, run in enumerate(["r1", "r2", "r3"]):
        steps = np.arange(100, 1300, 100)
        acc = 1 / (1 + np.exp(-(steps - 500 - 150 * k) / 200))
        loss = 3.0 - 0.5 * np.log(steps / 100) + 0.3 * k  # monotone in step but offset per run
        pieces += [
            series(run, steps, ACC, acc, 0.01),
            series(run, steps, LOSS, loss),
            series(run, steps, "proxy_rank", -np.log(acc)),  # a perfect (decreasing) predictor
            series(run, steps, "noise", rng.standard_normal(len(steps))),
            series(run, steps, "train/lr", np.linspace(1, 0, len(steps))),
            series(run, steps, "hellaswag/acc,none", acc),
        ]
    return pd.concat(pieces, ignore_index=True)


def test_a_signal_computed_at_a_few_checkpoints_counts_only_where_it_was_measured():
    """Interpolating a sparse signal between its checkpoints would invent points and overstate the evidence."""
    frame = ranking_frame()
    sparse = frame[(frame["metric"] == "proxy_rank") & frame["step"].isin([100, 500, 900, 1200])]
    dense_log = frame[frame["metric"] == LOSS].copy()
    dense_log = pd.concat([dense_log, dense_log.assign(step=dense_log["step"] + 50, metric="train/loss_log")])
    dense_log.loc[dense_log["metric"] == LOSS, "metric"] = "train/loss_log"
    frame = pd.concat([frame[frame["metric"] != "proxy_rank"], sparse.assign(metric="proxy_sparse"), dense_log])
    out = predictor_ranking(frame, ACC, loss_metric=LOSS).set_index("predictor")
    assert out.loc["proxy_sparse", "n"] == 3 * 4  # measured at 4 checkpoints of each run, not 12
    assert out.loc["train/loss_log", "n"] == 36  # logged more densely than the score: interpolated as before
    aligned = dv.align(frame, "proxy_sparse", ACC)
    assert len(aligned) == 36, "align itself still interpolates unless asked"
    assert len(dv.align(frame, "proxy_sparse", ACC, measured_only=True)) == 12


def test_predictor_ranking_puts_planted_predictor_first_and_noise_last():
    out = predictor_ranking(ranking_frame(), ACC, loss_metric=LOSS)
    assert list(out.columns) == RANKING_COLUMNS
    assert out["predictor"].tolist() == ["proxy_rank", LOSS, "noise"]  # lr and other tasks are not signals
    best = out.iloc[0]
    assert best["spearman"] == pytest.approx(-1.0) and best["sign"] == -1 and best["n"] == 36
    assert best["loo_rmse"] < out.iloc[1]["loo_rmse"] < out.iloc[2]["loo_rmse"]
    assert best["loo_r2"] > 0.95 and out.iloc[2]["loo_r2"] < 0.2
    assert out["is_loss"].tolist() == [False, True, False]
    assert (out["run"] == dv.POOLED).all()
    # The perfect predictor beats the (run-offset) loss; noise does not; the loss is not tested against itself.
    assert out["beats_loss"].tolist() == [True, False, False]
    assert out.iloc[0]["beats_loss_p"] <= 0.05 and np.isnan(out.iloc[1]["beats_loss_p"])


def test_predictor_ranking_per_run_and_candidates():
    out = predictor_ranking(ranking_frame(), ACC, candidates=["noise", "proxy_rank"], per_run=True)
    pooled = out[out["run"] == dv.POOLED]
    assert pooled["predictor"].tolist() == ["proxy_rank", "noise"]
    per_run = out[out["run"] != dv.POOLED]
    assert sorted(per_run["run"].unique()) == ["r1", "r2", "r3"]
    assert per_run[per_run["predictor"] == "proxy_rank"]["abs_spearman"].to_numpy() == pytest.approx([1.0] * 3)
    assert (per_run["n"] == 12).all()
    few = predictor_ranking(ranking_frame().query("step <= 100"), ACC, candidates=["noise"])
    assert few.empty and list(few.columns) == RANKING_COLUMNS


def test_predictor_ranking_isotonic_loo_by_hand():
    # y = x^2 on x = 0..4 (monotone): leaving out an inner point, the fit interpolates its neighbours.
    x = np.arange(5.0)
    errors = _loo_errors(x, x**2)
    assert errors.tolist() == pytest.approx([0 - 1, 1 - (0 + 4) / 2, 4 - (1 + 9) / 2, 9 - (4 + 16) / 2, 16 - 9])
    # Held out at chosen points only, each against all four others.
    assert _loo_errors(x, x**2, np.array([0, 2, 4])).tolist() == pytest.approx([-1, -1, 7])


def test_isotonic_fit_agrees_with_the_reference_pava():
    rng = np.random.default_rng(0)
    for _ in range(50):
        x = rng.integers(0, 15, 25).astype(float)  # ties included
        y = rng.standard_normal(25)
        ux, fit = isotonic_fit(x, y, increasing=bool(rng.integers(2)))
        counts = np.array([(x == u).sum() for u in ux], dtype=float)
        means = np.array([y[x == u].mean() for u in ux])
        inc = bool(np.all(np.diff(fit) >= -1e-12))
        want = pava(means, counts) if inc else -pava(-means, counts)
        np.testing.assert_allclose(fit, want, atol=1e-12)


# -- input errors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda f: align(f, "nope", ACC),
        lambda f: correlations(f, LOSS, ["nope"]),
        lambda f: correlations(align(f, LOSS, ACC), LOSS, "nope"),
        lambda f: divergence_windows(f, LOSS, "nope"),
        lambda f: matched_loss(f, "nope", ACC),
        lambda f: residuals(f, "nope", ACC),
        lambda f: predictor_ranking(f, "nope"),
        lambda f: predictor_ranking(f, ACC, candidates=["nope"]),
    ],
)
def test_unknown_metric_names_the_available_ones(call):
    with pytest.raises(ValueError, match=r"^metric 'nope' not in the data; available: .*arc_easy/acc,none") as info:
        call(grokking_frame())
    assert "\n" not in str(info.value)


def test_other_input_errors():
    frame = grokking_frame()
    with pytest.raises(ValueError, match="x-axis 'epoch'"):
        align(frame, LOSS, ACC, x="epoch")
    with pytest.raises(ValueError, match="lacks column"):
        align(frame.drop(columns="metric"), LOSS, ACC)
    with pytest.raises(ValueError, match="lo <= hi"):
        correlations(frame, LOSS, ACC, window=(3000, 1000))
    with pytest.raises(ValueError, match="min_points"):
        divergence_windows(frame, LOSS, ACC, min_points=1)
    with pytest.raises(ValueError, match="loss_tol"):
        divergence_windows(frame, LOSS, ACC, loss_tol=-1)
    with pytest.raises(ValueError, match="alpha"):
        divergence_windows(frame, LOSS, ACC, alpha=1.5)
    with pytest.raises(ValueError, match="n_sim"):
        divergence_windows(frame, LOSS, ACC, n_sim=10)


def test_empty_input_gives_empty_frames():
    frame = grokking_frame()
    frame["value"] = np.nan
    assert align(frame, LOSS, ACC).empty
    assert correlations(frame, LOSS, ACC).empty
    assert divergence_windows(frame, LOSS, ACC).empty
    assert matched_loss(frame, LOSS, ACC).empty
    assert residuals(frame, LOSS, ACC).empty
    assert predictor_ranking(frame, ACC).empty


def test_gaps_and_residuals_say_which_sign_is_better_by_the_scores_direction():
    frame = two_runs_frame()
    assert matched_loss(frame, LOSS, ACC).attrs["higher_is_better"] is True
    assert dv.better_sign(residuals(frame, LOSS, ACC), "the loss") == "(positive: better than the loss)"
    ppl = frame.assign(metric=frame["metric"].replace({ACC: "wikitext/word_perplexity,none"}))
    matched = matched_loss(ppl, LOSS, "wikitext/word_perplexity,none")
    assert dv.better_sign(matched, "the reference") == "(negative: better than the reference)"
    from analysis.charts import residual_figure

    fig = residual_figure(residuals(ppl, LOSS, "wikitext/word_perplexity,none"), x="step")
    assert "below 0: better" in fig.layout.yaxis.title.text


def test_each_window_reads_as_one_sentence_with_its_interval_and_p_value():
    windows = divergence_windows(grokking_frame(), LOSS, ACC)
    (sentence,) = dv.window_sentences(windows, ACC)
    w = windows.iloc[0]
    assert sentence.startswith("a, step 1000 to 3000 (flat loss): arc_easy/acc,none +0.8 (90% simultaneous")
    assert f"{w['change_lo']:+.3g} to {w['change_hi']:+.3g}" in sentence
    # A planted move no simulated run comes near: the p-value is the simulation's floor, printed as a bound.
    assert w["p_adjusted"] == pytest.approx(1 / 2001) and "adjusted p <= 0.0005" in sentence
    weaker = windows.assign(p_adjusted=0.01)
    assert "adjusted p = 0.01" in dv.window_sentences(weaker, ACC)[0]


def test_the_training_loss_is_offered_first_then_the_logged_evaluation_loss():
    assert dv.loss_metrics(["eval/loss", "heldout/heldout_loss", "train/loss"])[:2] == ["train/loss", "eval/loss"]


def test_lm_eval_perplexities_serve_as_the_loss_after_logged_and_held_out_losses():
    names = ["lambada_openai/ppl,none", "piqa/acc,none", "wikitext/word_perplexity,none", "train/loss",
             "heldout/heldout_loss", "wikitext/bits_per_byte,none", "lambada_openai/perplexity,none",
             "wikitext/byte_perplexity,none", "lambada_openai/perplexity_stderr,none", "arc/acc_norm,none"]  # fmt: skip
    assert dv.loss_metrics(names) == [
        "train/loss", "heldout/heldout_loss", "wikitext/bits_per_byte,none", "wikitext/byte_perplexity,none",
        "wikitext/word_perplexity,none", "lambada_openai/perplexity,none", "lambada_openai/ppl,none",
    ]  # fmt: skip
    # A run known only from Pythia-style result files: its lambada perplexity is the loss, accuracy the score.
    only_evals = ["lambada_openai/acc,none", "lambada_openai/ppl,none", "piqa/acc,none"]
    assert dv.loss_metrics(only_evals) == ["lambada_openai/ppl,none"]
    scores = dv.downstream_metrics(only_evals)
    assert scores[0] == "lambada_openai/acc,none" and scores[-1] == "lambada_openai/ppl,none"
    assert dv.downstream_metrics(["wikitext/word_perplexity,none", "zz/acc,none"])[0] == "zz/acc,none"
    # The fine-tune probe's scores (of a fine-tuned copy) come after the checkpoint's own.
    tuned = ["finetune/modsub/change:task/acc,none", "finetune/modsub/post", "task/acc,none", "task/f1,none"]
    assert dv.downstream_metrics(tuned)[:2] == ["task/acc,none", "task/f1,none"]
    assert dv.loss_metrics(["piqa/acc,none", "train/accuracy", "ppl_task/acc,none"]) == []
    assert dv.downstream_metrics(["train/accuracy", "eval/accuracy", "piqa/acc,none"]) == [
        "piqa/acc,none",
        "eval/accuracy",
    ]


def test_a_tasks_continuous_counterparts_are_ranked_as_signals_and_its_other_scores_are_not():
    frame = ranking_frame()
    acc = frame[frame["metric"] == ACC]
    frame = pd.concat([frame, acc.assign(metric="arc_easy/p_correct,none", value=acc["value"] ** 0.5)])
    out = predictor_ranking(frame, ACC, loss_metric=LOSS)
    assert "arc_easy/p_correct,none" in set(out["predictor"]) and "hellaswag/acc,none" not in set(out["predictor"])
    assert out.iloc[0]["predictor"] in ("arc_easy/p_correct,none", "proxy_rank")
