"""Pathways: mixture-of-experts routing over training, and inside the groups of samples memorised at each step."""

from __future__ import annotations

import streamlit as st

from analysis import memorisation as mem
from analysis.charts import group_trends_figure
from pages import _state

PATHWAYS = (
    "pathway_distance", "pathway_consistency", "routing_entropy", "expert_load",
    "pathway_distance_chars", "pathway_consistency_normalized",
)  # fmt: skip

_state.signal_view("Pathways", PATHWAYS, "routing metrics")

st.header("Inside memorised groups")
sel = _state.chosen()  # signal_view drew the sidebar
c1, c2, c3, c4, c5 = st.columns([2, 2, 2, 2, 2])
run = c1.selectbox("Run", sel.runs, key="group_run", bind="query-params")
domains = sorted(m.removesuffix("/sample_loss") for m in _state.sample_metrics(run) if m.endswith("/sample_loss"))
if not domains:
    st.info(
        "Memorisation groups need each probe sample's loss and pathway at every checkpoint; "
        f"none are cached for {_state.md_text(run)} yet."
    )
    st.code(f"python -m analysis eval --run {run} --metrics memorisation --param memorisation.answer_tokens=1")
    st.stop()
domain = _state.metric_picker(c2, "Probe domain", domains, ["train"], "group_domain")
eps = c3.number_input("Learnt below loss (eps)", 0.001, 10.0, mem.DEFAULT_EPS, 0.05, key="eps", bind="query-params")
delta = c4.number_input("Within delta of final", 0.0, 10.0, mem.DEFAULT_DELTA, 0.01, key="delta", bind="query-params")
n_groups = c5.number_input("Groups", 1, 8, 4, 1, key="groups", bind="query-params")
group_metric = st.radio(
    "Group metric", list(mem.GROUP_METRICS), horizontal=True, key="group_metric", bind="query-params"
)


@st.cache_data(max_entries=16, show_spinner="Grouping samples by when they were memorised…")
def _groups(db: str, gen: int, run: str, domain: str, eps: float, delta: float, n_groups: int):
    rows = _state.sample_results(run, f"{domain}/sample_loss")
    table = mem.memorisation_table(rows, eps=eps, delta=delta)
    groups = mem.memorisation_groups(table, n_groups)
    return table, groups, mem.group_trends(table, groups)


try:
    table, groups, trends = _groups(str(sel.db), _state.generation(), run, domain, eps, delta, int(n_groups))
except ValueError as err:
    st.error(str(err))
    st.stop()

memorised = int((table.first_step != mem.NEVER).sum())
st.caption(
    f"{memorised} of {len(table.sample_ids)} {_state.md_text(domain)} samples memorised "
    f"(loss <= {eps:g} from some checkpoint on, within {delta:g} of their final loss). "
    "Dotted lines: where each group's memorisation begins."
)
marks = {name: float(table.first_step[idx].min()) for name, idx in groups.items() if name != "never memorised"}
fig = group_trends_figure(
    trends, group_metric, style=sel.style, marks=marks, title=f"{run}: {group_metric} per memorisation group"
)
st.plotly_chart(fig, width="stretch", key="group_trends")
sizes = {name: len(idx) for name, idx in groups.items()}
st.dataframe(
    trends[trends["metric"] == group_metric]
    .pivot_table(index="step", columns="group", values="value")
    .rename(columns=lambda g: f"{g} (n={sizes.get(g, 0)})")
    .reset_index(),
    hide_index=True,
    width="stretch",
)
