"""Overview: every downstream score of the selected runs as small multiples, one panel per task or task group,
most moved first (the same view as the report's overview)."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from analysis.charts import X_LABELS, small_multiples_figure
from analysis.overview import moved_sentence, overview
from pages import _state

sel = _state.selection()
st.title("Overview")
_state.require_runs(sel)

view = overview(_state.long_table(sel.runs))
if not len(view.panels):
    st.warning("The selected runs have no downstream score yet: evaluate or import some checkpoints first.")
    st.page_link("pages/evaluate.py", label="Open the Evaluate page", icon=":material/play_arrow:")
    st.stop()

c1, c2, c3 = st.columns([4, 2, 2])
find = c1.text_input("Filter panels", key="find", bind="query-params", placeholder="task name, e.g. mmlu or arc")
# Projector fonts fit two panels a row at 1280 px; four overlap their titles and tick labels.
cols = c2.selectbox("Columns", [2, 3, 4, 5], index=0 if sel.style.large else 2, key="cols", bind="query-params")
log_x = c3.toggle(f"log {X_LABELS.get(sel.x, sel.x)}", value=True, key="log_x", bind="query-params")

panels = view.panels
if find:
    hit = panels["panel"].str.contains(find, case=False, regex=False)
    hit |= panels["members"].str.contains(find, case=False, regex=False)
    panels = panels[hit]
st.caption(
    moved_sentence(view) + ". One panel per task (its primary metric), a task group as its mean (dashed, marked "
    "derived when computed from the subjects); shared x, ±1 stderr bands, one colour per run. The order is by "
    "first-to-last change in stderrs of that change: an ordering, not a test."
)
titles = [
    (
        r.panel,
        r.panel.removesuffix(",none") + (f" ({r.n_members} subjects)" if r.n_members > 1 else ""),
        r.derived != "",
    )
    for r in panels.itertuples()
]
if not titles:
    st.info(f"No panel matches {find!r}.")
    st.stop()
fig = small_multiples_figure(
    view.series, titles, x=sel.x, log_x=log_x, colors=sel.colors, style=sel.style, cols=cols,
    panel_height=260 if sel.style.large else 200,
)  # fmt: skip
st.plotly_chart(fig, width="stretch", config={"displaylogo": False})

for row in panels[panels["n_members"] > 1].itertuples():
    mine = view.members[view.members["panel"] == row.panel].drop_duplicates("task")
    with st.expander(f"{row.panel}: {row.derived or 'reported by lm-eval'} ({row.n_members} tasks)"):
        st.dataframe(mine.drop(columns="panel"), hide_index=True, width="stretch")

table = panels.assign(derived=panels["derived"].map(lambda d: d or ""), moved=panels["moved"].round(2))
st.dataframe(pd.DataFrame(table.drop(columns="members")), hide_index=True, width="stretch")
