"""Divergence figures: the traces, shapes and axes they are built from, read straight off the figure objects."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis import charts
from analysis import divergence as dv
from analysis.charts import ChartStyle, run_colors
from tests.test_divergence import ACC, LOSS, grokking_frame, ranking_frame, series, two_runs_frame


def _traces(fig, name: str | None = None, yaxis: str | None = None) -> list:
    return [
        t
        for t in fig.data
        if (name is None or t.name == name) and (yaxis is None or getattr(t, "yaxis", None) == yaxis)
    ]


def _is_empty(fig) -> bool:
    return not fig.data and len(fig.layout.annotations) == 1


def test_loss_downstream_rows_colours_and_windows():
    frame = pd.concat([grokking_frame(), two_runs_frame()], ignore_index=True)
    windows = dv.divergence_windows(frame, LOSS, ACC)
    assert set(windows["kind"]) == {"grokking"}
    style = ChartStyle(large=True)
    fig = charts.loss_downstream_figure(frame, LOSS, ACC, windows=windows, style=style)
    colors = run_colors(["a", "fast", "slow"])
    assert {t.type for t in fig.data} == {"scatter"}  # SVG, not WebGL
    for run in ("a", "fast", "slow"):
        (top,) = _traces(fig, run, "y")
        (bottom,) = _traces(fig, run, "y2")
        assert top.line.color == bottom.line.color == colors[run]
        assert top.showlegend and not bottom.showlegend  # one legend entry per run
        want = frame[(frame["run"] == run) & (frame["metric"] == ACC)].sort_values("step")
        np.testing.assert_allclose(np.asarray(bottom.x), want["step"])
        np.testing.assert_allclose(np.asarray(bottom.y), want["value"])
        (band,) = _traces(fig, f"{run} ±1 stderr", "y2")  # downstream stderr band
        assert band.fill == "toself"
    # The grokking window: one rectangle per row, labelled on the top row only.
    shapes = fig.layout.shapes
    assert len(shapes) == 2 * len(windows)
    assert [(s.x0, s.x1) for s in shapes[:2]] == [(1000, 3000), (1000, 3000)]
    assert {s.yref for s in shapes[:2]} == {"y domain", "y2 domain"}
    assert shapes[0].fillcolor == "rgba(0,158,115,0.16)"
    assert shapes[0].label.text == "grokking · a" and not shapes[1].label.text
    assert fig.layout.xaxis.matches == "x2"  # zooming one row zooms both
    assert fig.layout.font.size == style.font_size
    assert fig.layout.yaxis.title.text == LOSS and fig.layout.yaxis2.title.text == ACC


def test_loss_downstream_smoothing_log_x_and_single_points():
    frame = pd.concat([grokking_frame(), series("solo", [500], LOSS, [2.0]), series("solo", [500], ACC, [0.3])])
    fig = charts.loss_downstream_figure(frame, LOSS, ACC, smoothing=0.6, log_x=True)
    raw = _traces(fig, "a (raw)", "y")
    assert len(raw) == 1 and raw[0].opacity == pytest.approx(0.3)
    (smooth,) = _traces(fig, "a", "y")
    np.testing.assert_allclose(np.asarray(smooth.y), charts.ema(np.asarray(raw[0].y), 0.6))
    assert [t.mode for t in _traces(fig, "solo")] == ["markers", "markers"]  # a one-point line would be invisible
    assert fig.layout.xaxis2.type == "log"
    assert _is_empty(charts.loss_downstream_figure(frame, "nope", "nope either"))
    with pytest.raises(ValueError, match="x-axis"):
        charts.loss_downstream_figure(frame, LOSS, ACC, x="epoch")


def test_trajectory_figure_markers_by_step_and_reversed_loss():
    aligned = dv.align(two_runs_frame(), LOSS, ACC)
    fig = charts.trajectory_figure(aligned)
    assert [t.name for t in fig.data] == ["fast", "slow"]
    fast = fig.data[0]
    want = aligned[aligned["run"] == "fast"]
    np.testing.assert_allclose(np.asarray(fast.x), want["left"])
    np.testing.assert_allclose(np.asarray(fast.y), want["right"])
    np.testing.assert_allclose(np.asarray(fast.customdata), want["step"])
    assert fast.marker.coloraxis == "coloraxis" and fast.line.color == run_colors(["fast", "slow"])["fast"]
    np.testing.assert_allclose(np.asarray(fast.marker.color), want["step"])  # 250..5000: linear scale
    np.testing.assert_allclose(np.asarray(fast.error_y.array), 0.02)
    assert "step" in fast.hovertemplate
    assert fig.layout.xaxis.autorange == "reversed"
    assert charts.trajectory_figure(aligned, reverse_loss=False).layout.xaxis.autorange != "reversed"
    # Steps over more than two decades are coloured on a log scale, with step ticks on the colour bar.
    wide = pd.concat([series("r", [1, 10, 100, 1000], LOSS, [4, 3, 2, 1]), series("r", [1, 10, 1000], ACC, [0, 1, 2])])
    fig = charts.trajectory_figure(dv.align(wide, LOSS, ACC))
    np.testing.assert_allclose(np.asarray(fig.data[0].marker.color), [0, 1, 3])
    assert list(fig.layout.coloraxis.colorbar.ticktext) == ["1", "10", "100", "1,000"]
    assert _is_empty(charts.trajectory_figure(dv.align(wide.assign(value=np.nan), LOSS, ACC)))


def test_matched_loss_figure_error_bars():
    matched = dv.matched_loss(two_runs_frame(), LOSS, ACC, ["fast", "slow"], levels=4)
    fig = charts.matched_loss_figure(matched)
    assert [t.name for t in fig.data] == ["fast (reference)", "slow"]
    slow = fig.data[1]
    want = matched[matched["run"] == "slow"].sort_values("loss_level")
    np.testing.assert_allclose(np.asarray(slow.x), want["loss_level"])
    np.testing.assert_allclose(np.asarray(slow.y), want["downstream"])
    np.testing.assert_allclose(np.asarray(slow.error_y.array), 0.03)
    np.testing.assert_allclose(np.asarray(slow.customdata)[:, 0], 0.05)  # the gap, shown on hover
    assert slow.line.color == run_colors(["fast", "slow"])["slow"]
    assert fig.layout.xaxis.autorange == "reversed"
    assert _is_empty(charts.matched_loss_figure(matched.iloc[0:0]))


def test_ranking_heatmap_signed_and_ordered():
    frame = ranking_frame()
    ranking = pd.concat(
        [
            dv.predictor_ranking(frame, ACC, loss_metric=LOSS, per_run=True),
            dv.predictor_ranking(frame, "hellaswag/acc,none", candidates=["noise", "proxy_rank"]),
        ]
    )
    fig = charts.ranking_heatmap(ranking)
    (heat,) = fig.data
    assert heat.type == "heatmap"
    assert list(heat.y) == ["proxy_rank", "train/loss (loss)", "noise"]  # strongest on top
    assert list(heat.x) == [ACC, "hellaswag/acc,none"]
    z = np.asarray(heat.z, dtype=float)
    assert z[0, 0] == pytest.approx(-1.0) and z[1, 1] != z[1, 1]  # loss was not ranked for hellaswag: NaN
    assert (heat.zmin, heat.zmax, heat.zmid) == (-1.0, 1.0, 0.0)
    assert heat.text[0][0] == "-1.00<br>n=36" and heat.text[1][1] == ""
    assert fig.layout.yaxis.autorange == "reversed"
    assert _is_empty(charts.ranking_heatmap(ranking.iloc[0:0]))


def test_metric_vs_figure():
    frame = ranking_frame()
    fig = charts.metric_vs_figure(frame, "proxy_rank", ACC, log_metric=True)
    assert [t.name for t in fig.data] == ["r1", "r2", "r3"]
    r2 = frame[(frame["run"] == "r2")]
    np.testing.assert_allclose(np.asarray(fig.data[1].x), r2[r2["metric"] == "proxy_rank"]["value"])
    np.testing.assert_allclose(np.asarray(fig.data[1].y), r2[r2["metric"] == ACC]["value"])
    assert fig.data[1].marker.color == run_colors(["r1", "r2", "r3"])["r2"]
    assert fig.layout.xaxis.type == "log"
    single = charts.metric_vs_figure(frame[frame["step"] == 100], "proxy_rank", ACC)
    assert {t.mode for t in single.data} == {"markers"}
    with pytest.raises(ValueError, match="metric 'nope' not in the data"):
        charts.metric_vs_figure(frame, "nope", ACC)


def test_residual_figure_draws_each_runs_distance_from_the_pooled_line():
    # Two runs on the same loss path; "b" scores 0.1 more at every checkpoint. The pooled line sits
    # between them, so "a" is 0.05 below it and "b" 0.05 above it everywhere (checked by hand below).
    steps = np.array([10, 20, 40, 80, 160])
    loss = 3.0 - 0.4 * np.log2(steps / 10)
    parts = []
    for run, lift in (("a", 0.0), ("b", 0.1)):
        parts += [series(run, steps, LOSS, loss), series(run, steps, ACC, 0.9 - 0.2 * loss + lift)]
    frame = pd.concat(parts, ignore_index=True)
    residual = dv.residuals(frame, LOSS, ACC)
    fig = charts.residual_figure(residual)
    colors = run_colors(["a", "b"])
    for run, want in (("a", -0.05), ("b", 0.05)):
        (trace,) = _traces(fig, run)
        assert list(trace.x) == list(steps) and trace.line.color == colors[run]
        assert np.allclose(trace.y, want, atol=1e-9)
    assert fig.layout.shapes[0].y0 == 0 and fig.layout.xaxis.type == "log"
    assert "score = 0.95 -0.2 · loss" in fig.layout.title.text  # the pooled fit: (0.9 + 1.0) / 2 - 0.2 · loss
    assert _is_empty(charts.residual_figure(residual.iloc[0:0]))


def test_a_narrow_windows_label_runs_up_its_middle_and_a_wide_ones_sits_in_a_corner():
    frame = grokking_frame()  # x from 10 to 5000, linear axis
    windows = pd.DataFrame({"run": ["a", "a"], "kind": ["grokking", "inverse"], "start": [1000, 4000],
                            "end": [3000, 4200]})  # fmt: skip
    fig = charts.loss_downstream_figure(frame, LOSS, ACC, windows=windows, log_x=False)
    wide, narrow = fig.layout.shapes[0].label, fig.layout.shapes[2].label
    assert (wide.textangle, wide.textposition) == (0, "top left")  # 2000 of a 4990-wide axis
    assert (narrow.textangle, narrow.textposition) == (-90, "middle center")  # 200 of it: under a tenth
    assert narrow.text == "inverse · a"
    # On a log axis, width is measured in decades: 1000..3000 is 0.48 of 2.7 decades, still wide.
    log_fig = charts.loss_downstream_figure(frame, LOSS, ACC, windows=windows.iloc[:1], log_x=True)
    assert log_fig.layout.shapes[0].label.textangle == 0


def test_an_unconverged_estimate_is_a_hollow_cross_off_the_line():
    import pandas as pd

    from analysis.charts import curves_figure

    frame = pd.DataFrame(
        {
            "run": "r",
            "step": [1, 2, 3],
            "metric": "hessian_top_eigenvalue",
            "value": [3.0, 0.001, 5.0],
            "stderr": None,
            "converged": [True, False, True],
        }
    )
    fig = curves_figure(frame, "hessian_top_eigenvalue")
    line = next(t for t in fig.data if t.name == "r")
    cross = next(t for t in fig.data if t.name == "r (not converged)")
    assert list(line.y) == [3.0, 5.0] and list(cross.y) == [0.001]
    assert cross.mode == "markers" and "did not converge" in fig.layout.title.text


def test_lr_phases_are_grey_bands_clipped_to_the_data_and_shared_by_runs_with_one_schedule():
    frame = grokking_frame()  # x from 10 to 5000
    phases = pd.DataFrame(
        {
            "run": ["a", "b", "a", "a"],
            "phase": ["decay", "decay", "warmup", "stable"],
            "start": [4000.0, 4000.0, 0.0, 100.0],
            "end": [6000.0, 6000.0, 100.0, 4000.0],
        }
    )
    fig = charts.loss_downstream_figure(frame, LOSS, ACC, phases=phases, log_x=True)
    shapes = fig.layout.shapes
    assert len(shapes) == 4  # decay (shared by a and b) and warmup, on both rows; stable is not shaded
    decay = [s for s in shapes if s.fillcolor == charts.PHASE_FILLS["decay"]]
    assert [(s.x0, s.x1) for s in decay] == [(4000, 5000), (4000, 5000)]  # clipped to the last point
    warmup = next(s for s in shapes if s.fillcolor == charts.PHASE_FILLS["warmup"])
    assert (warmup.x0, warmup.x1) == (10, 100)  # step 0 has no place on a log axis: from the first point
    keys = [t for t in fig.data if t.name.startswith("lr ")]  # named once each in the legend, never in the plot
    assert [t.name for t in keys] == ["lr decay · a, b", "lr warmup · a"]
    assert all(t.x == (None,) and t.marker.color == charts.PHASE_SWATCHES[t.name.split()[1]] for t in keys)
    assert not any(s.label.text for s in shapes)
    plain = charts.loss_downstream_figure(frame, LOSS, ACC)
    assert len(plain.layout.shapes) == 0 and not any(t.name.startswith("lr ") for t in plain.data)


@pytest.mark.parametrize("large", [False, True])
def test_every_text_has_an_explicit_size_so_a_theme_cannot_shrink_the_projector_fonts(large: bool):
    style = ChartStyle(large=large)
    fig = charts.loss_downstream_figure(grokking_frame(), LOSS, ACC, style=style)
    layout = fig.layout
    assert layout.legend.font.size == layout.hoverlabel.font.size == style.font_size
    assert layout.title.font.size == style.font_size + 2
    for axis in (layout.xaxis, layout.xaxis2, layout.yaxis, layout.yaxis2):
        assert axis.title.font.size == style.font_size and axis.tickfont.size == style.tick_size
    # The legend sits at the foot of the figure, so rows of it can never run into the title.
    assert (layout.legend.yref, layout.legend.y, layout.legend.yanchor) == ("container", 0, "bottom")


def test_long_titles_and_metric_names_wrap_at_separators_for_the_projector():
    name = "modarith_em/exact_match,first_word"
    assert charts.wrap_text(name, 26) == "modarith_em/exact_match,<br>first_word"
    assert charts.wrap_text("short", 26) == "short"
    assert charts.wrap_text("a b c d", 3) == "a b<br>c d"
    big = charts.trajectory_figure(dv.align(two_runs_frame(), LOSS, ACC), style=ChartStyle(large=True))
    assert all(len(line) <= 40 for line in big.layout.title.text.split("<br>"))
    small = charts.trajectory_figure(dv.align(two_runs_frame(), LOSS, ACC))
    assert "<br>" not in small.layout.title.text  # a short title stays on one line
    # A two-line title gets a taller top margin than a one-line one.
    assert big.layout.margin.t > small.layout.margin.t
