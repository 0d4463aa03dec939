"""Fine-tune: each checkpoint's score before and after a short fine-tune, what it forgot, and the proxy beside it."""

from __future__ import annotations

import json

import streamlit as st

from analysis.finetune import FINETUNE
from analysis.finetune.charts import effects_figure, prepost_figure, sensitivity_figure
from analysis.finetune.config import config_from_params
from analysis.finetune.windows import finetune_tasks, overtraining_windows
from pages import _state

sel = _state.selection()
st.title("Fine-tune")
if not sel.runs:
    st.info("Pick runs in the sidebar.")
    st.stop()

frame = _state.long_table(sel.runs)
tasks = finetune_tasks(_state.metric_names(frame))
if not tasks:
    st.warning("No fine-tune results cached for these runs yet.")
    st.code(f"python -m analysis eval --run {sel.runs[0]} --metrics finetune --param finetune.task=modsub")
    st.page_link("pages/evaluate.py", label="Open the Evaluate page", icon=":material/play_arrow:")
    st.stop()

c1, c2, c3 = st.columns([3, 2, 2])
task = _state.metric_picker(c1, "Task fine-tuned on", tasks, tasks, "task")
alpha = c2.number_input(
    "False-alarm rate (α)", 0.001, 0.5, 0.05, 0.01, key="alpha", bind="query-params", format="%.3f",
    help="The chance that a run whose score after fine-tuning does not move gets any window",
)  # fmt: skip
log_x = c3.toggle("Log x", value=True, key="logx", bind="query-params")
scored = frame.loc[frame["metric"].isin([f"{FINETUNE}/{task}/pre", f"{FINETUNE}/{task}/post"]), "value"].dropna()
wide = bool(len(scored)) and scored.min() > 0 and scored.max() > 100 * scored.min()  # a perplexity over decades
log_y = c3.toggle(
    "Log y", value=wide, key="logy", bind="query-params",
    help="For perplexity-like scores; on by default when the scores span more than two decades.",
)  # fmt: skip
post_m = f"{FINETUNE}/{task}/post"
chosen = _state.setting_picker(sel.runs, [post_m])
scope = [m for m in _state.metric_names(frame) if m.startswith(f"{FINETUNE}/{task}/")]
frame = _state.long_table(sel.runs, {m: chosen[post_m] for m in scope} if post_m in chosen else None)

rows = frame[frame["metric"] == post_m]
settings = {p: config_from_params(json.loads(p)).describe() for p in rows["params"].unique()}
params = json.loads(rows["params"].iloc[0])
score = params.get("score") or "the task's first score"
if len(settings) == 1:
    st.caption(
        f"Every checkpoint fine-tuned the same way: {_state.md_text(next(iter(settings.values())))}; "
        f"scored on {params.get('limit') or 'all'} test documents ({_state.md_text(score)})."
    )
else:
    st.error("These runs' checkpoints were fine-tuned with different settings; pick one setting above.")

windows = _state.guarded(lambda: overtraining_windows(frame, task, x=sel.x, alpha=alpha))
fig = prepost_figure(frame, task, windows=windows, x=sel.x, log_x=log_x, log_y=log_y, colors=sel.colors,
                     style=sel.style, score_label=str(score))  # fmt: skip
st.plotly_chart(fig, width="stretch", key="prepost")

st.subheader("Catastrophic overtraining: the base model improves, the fine-tuned one gets worse")
if len(windows):
    for w in windows.itertuples():
        st.markdown(
            f"- **{_state.md_text(w.run)}**, {sel.x} {w.start:g} to {w.end:g}: before fine-tuning "
            f"{w.pre_change:+.3g}, after {w.post_change:+.3g} ({1 - 2 * alpha:.0%} simultaneous interval "
            f"{w.change_lo:+.3g} to {w.change_hi:+.3g}), adjusted p = {w.p_adjusted:.3g}"
        )
else:
    st.markdown(
        f"No window at alpha {alpha:g}: in no span where the score before fine-tuning improved by more than its "
        "noise did the score after fine-tuning get worse beyond its own (family-wise over each run's spans)."
    )
st.dataframe(windows.round(4), hide_index=True, width="stretch")

effects = effects_figure(frame, task, x=sel.x, log_x=log_x, colors=sel.colors, style=sel.style)
st.plotly_chart(effects, width="stretch", key="effects")
left, right = st.columns([3, 1])
left.plotly_chart(sensitivity_figure(frame, task, colors=sel.colors, style=sel.style), width="stretch", key="sens")
right.caption(
    "Perturbation sensitivity is the cheap proxy for 'harder to fine-tune': if it tracks the real thing, the "
    "score after fine-tuning gets worse as the sensitivity grows."
)
table = frame[frame["metric"].isin(scope)].pivot_table(index=["run", "step"], columns="metric", values="value")
st.dataframe(table.reset_index().round(4), hide_index=True, width="stretch")
