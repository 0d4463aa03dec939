"""Samples: one evaluation's items across checkpoints. Which flipped from wrong to right, and when."""

from __future__ import annotations

import numpy as np
import streamlit as st

from analysis import samples as sm
from analysis.charts import learnt_figure, sample_heatmap
from pages import _state

sel = _state.selection()
st.title("Samples")
_state.require_runs(sel)

c1, c2, c3 = st.columns([2, 3, 3])
run = c1.selectbox("Run", sel.runs, key="sample_run", bind="query-params")
# Scored items only: memorisation rows (loss per sample) are on the Pathways page.
metrics = [m for m in _state.sample_metrics(run) if not m.endswith("/sample_loss")]
if not metrics:
    st.warning(f"Run {_state.md_text(run)} has no per-sample evaluation results yet.")
    st.code(f"python -m analysis eval --run {run} --tasks modarith_mc,modarith_em")
    st.page_link("pages/evaluate.py", label="Open the Evaluate page", icon=":material/play_arrow:")
    st.stop()
preferred = [m for m in metrics if m.endswith(("/acc,none", "/exact_match,first_word", "/exact_match,none"))]
metric = _state.metric_picker(c2, "Evaluation", metrics, preferred, "sample_metric")
status = c3.multiselect(
    "Show", list(sm.STATUSES), default=["learnt", "unstable", "forgotten"], key="status", bind="query-params"
)

rows = _state.sample_results(run, metric)
try:
    summary = sm.flip_summary(rows)
    right = sm.correctness(rows)
except ValueError as err:
    st.error(str(err))
    st.stop()

counts = summary["status"].value_counts()
cols = st.columns(len(sm.STATUSES))
for col, name in zip(cols, sm.STATUSES, strict=True):
    col.metric(name, int(counts.get(name, 0)), help=f"share {counts.get(name, 0) / max(len(summary), 1):.0%}")

per_step = sm.learnt_per_step(summary, right.columns)
st.plotly_chart(
    learnt_figure(per_step, len(summary), style=sel.style, title=f"{run}: {metric}, items learnt per checkpoint"),
    width="stretch",
    key="learnt",
)

shown = summary[summary["status"].isin(status)] if status else summary
# Learnt first at the top; items that never settle after them.
shown = shown.assign(_order=shown["learnt_at"].fillna(np.inf)).sort_values(["_order", "flips", "sample_id"])
if len(shown):
    heat = sample_heatmap(
        right, list(shown["sample_id"]), style=sel.style, title="right (blue) / wrong (vermillion) per checkpoint"
    )
    st.plotly_chart(heat, width="stretch", key="heatmap")
else:
    st.caption("No item has the chosen status.")
st.dataframe(
    shown.drop(columns="_order"),
    hide_index=True,
    width="stretch",
    column_config={"learnt_at": st.column_config.NumberColumn("learnt at step", format="%d")},
)
