"""What a signal page opens on: the signal of a family that best separates the runs, or a plain "none does".

A page of flatness or routing metrics should open on the one that tells the selected runs apart in the way the
downstream score does, judged by the predictor ranking (out-of-sample fit, tested against the loss), not on
whichever name sorts first; and when no signal of the family beats the loss, it should say so rather than show
a noise-level chart as if it meant something.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from analysis.divergence.frames import POOLED


def separating_signal(ranking: pd.DataFrame, family: Sequence[str], score: str, what: str) -> tuple[str | None, str]:
    """(the family's best signal in the pooled ``ranking``, or None; one sentence saying how good it is).

    ``ranking`` is :func:`analysis.divergence.predictor_ranking`'s frame (with a loss, so ``beats_loss`` is
    filled). The best is the family member with the highest out-of-sample R² over the pooled checkpoints.
    """
    if ranking is None or not len(ranking):
        return None, f"No {what} could be ranked against {score} (too few checkpoints with both)."
    pooled = ranking[(ranking["run"] == POOLED) & ranking["predictor"].isin(list(family))]
    pooled = pooled.dropna(subset=["loo_r2"]).sort_values("loo_r2", ascending=False)
    if not len(pooled):
        return None, f"No {what} could be ranked against {score} (too few checkpoints with both)."
    top = pooled.iloc[0]
    fit = f"out-of-sample R² {top['loo_r2']:.2f} over {int(top['n'])} checkpoints of the selected runs"
    p = top.get("beats_loss_p")
    against = f"adjusted p = {p:.2g} against the loss" if pd.notna(p) else "not tested against the loss"
    if bool(top.get("beats_loss")):
        return str(top["predictor"]), (
            f"Opens on {top['predictor']}: of the {what}, it predicts {score} best ({fit}) and better than the "
            f"loss does ({against})."
        )
    return None, (
        f"None of the {what} predicts {score} better than the loss on these runs (best: {top['predictor']}, {fit}, "
        f"{against}): what these charts show is not shown to separate the runs."
    )
