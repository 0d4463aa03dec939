"""The body of the signal pages (Geometry, Pathways): one metric family over training and against a score."""

from __future__ import annotations

import streamlit as st

from analysis.divergence.metric_roles import accuracy_first
from pages._cache import long_table, predictor_ranking, within_runs
from pages._markdown import md_text
from pages._sidebar import selection
from pages._widgets import metric_names, metric_picker, optional_metric_picker, setting_picker


def signal_view(title: str, family: tuple[str, ...], what: str) -> None:
    """A page of internal signals (one metric family) over training and against a downstream score."""
    from analysis import divergence as dv
    from analysis.charts import curves_figure, metric_vs_figure
    from analysis.divergence.defaults import separating_signal

    sel = selection()
    st.title(title)
    if not sel.runs:
        st.info("Pick runs in the sidebar.")
        st.stop()
    frame = long_table(sel.runs)
    names = metric_names(frame)
    signals = [m for m in names if m in family]
    if not signals:
        st.warning(f"No {what} cached for these runs yet.")
        st.code(f"python -m analysis eval --run {sel.runs[0]} --metrics {','.join(family[:3])}")
        st.page_link("pages/evaluate.py", label="Open the Evaluate page", icon=":material/play_arrow:")
        return
    c1, c2, c3 = st.columns([3, 3, 2])
    scores = dv.downstream_metrics(names)
    score = optional_metric_picker(c2, "Downstream", scores, accuracy_first(scores), "score")
    best, verdict = None, ""
    if score:  # open on the signal that separates the runs the way the score does, if one does
        losses = dv.loss_metrics(names)
        loss = losses[0] if losses else None
        ranking = predictor_ranking(sel.runs, score, loss, sel.x)
        within = (lambda s: within_runs(sel.runs, s, score, loss, sel.x)) if loss else None
        best, verdict = separating_signal(ranking, signals, md_text(score), what, within)
    signal = metric_picker(c1, "Signal", signals, [best, *signals] if best else signals, "signal")
    if verdict:
        (st.caption if best else st.info)(verdict)
    log_x = c3.toggle("Log x", value=True, key="logx", bind="query-params")
    log_y = c3.toggle("Log y", value=False, key="logy", bind="query-params")
    frame = long_table(sel.runs, setting_picker(sel.runs, [signal, score]))
    curve = curves_figure(frame, signal, x=sel.x, log_x=log_x, log_y=log_y, colors=sel.colors, style=sel.style)
    st.plotly_chart(curve, width="stretch", key="signal_curve")
    if score:
        fig = metric_vs_figure(frame, signal, score, x=sel.x, log_metric=log_y, colors=sel.colors, style=sel.style)
        st.plotly_chart(fig, width="stretch", key="signal_vs")
    table = frame[frame["metric"].isin(signals)].pivot_table(index=["run", "step"], columns="metric", values="value")
    st.dataframe(table.reset_index(), hide_index=True, width="stretch")
