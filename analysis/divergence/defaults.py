"""What a signal page opens on: the signal of a family that best separates the runs, or a plain "none does".

A page of flatness or routing metrics should open on the one that tells the selected runs apart in the way the
downstream score does, judged by the predictor ranking (out-of-sample fit, tested against the loss), not on
whichever name sorts first; and when no signal of the family beats the loss, it should say so rather than show
a noise-level chart as if it meant something.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import pandas as pd

from analysis.divergence.frames import POOLED


def separating_signal(
    ranking: pd.DataFrame,
    family: Sequence[str],
    score: str,
    what: str,
    within: Callable[[str], Mapping[str, float]] | None = None,
) -> tuple[str | None, str]:
    """(the family's best signal in the pooled ``ranking``, or None; one sentence saying how good it is).

    ``ranking`` is :func:`analysis.divergence.predictor_ranking`'s frame (with a loss, so ``beats_loss`` is
    filled). The best is the family member with the highest out-of-sample R² over the pooled checkpoints.
    Beating the loss there means the signal separates the runs the way the score does; ``within(signal)``
    (e.g. :func:`analysis.divergence.ranking.within_runs`, {run: p}) adds whether it also beats the loss inside
    each run, i.e. follows the score over training, so the sentence never claims more than was tested.
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
        name = str(top["predictor"])
        sentence = (
            f"Opens on {name}: of the {what}, it predicts {score} best across the selected runs ({fit}) and better "
            f"than the loss does ({against}), so it separates the runs as {score} does."
        )
        return name, sentence + _within_sentence(within(name) if within else {}, score)

    return None, (
        f"None of the {what} predicts {score} better than the loss on these runs (best: {top['predictor']}, {fit}, "
        f"{against}): what these charts show is not shown to separate the runs."
    )


def _within_sentence(p_by_run: Mapping[str, float], score: str, alpha: float = 0.05) -> str:
    """Whether the signal also beats the loss within each run (Holm over the runs), in one sentence or ''."""
    if not p_by_run:
        return ""
    from analysis.significance import holm

    runs = list(p_by_run)
    adjusted = dict(zip(runs, holm([p_by_run[r] for r in runs]), strict=True))
    listed = ", ".join(f"{r} p = {adjusted[r]:.2g}" for r in runs)
    beats = [r for r in runs if adjusted[r] <= alpha]
    if len(beats) == len(runs):
        return f" Within each run it beats the loss too ({listed}): it follows {score} over training."
    if beats:
        return (
            f" Within the runs it beats the loss only in {', '.join(beats)} ({listed}): elsewhere it is not shown "
            f"to follow {score} over training."
        )
    return (
        f" Within each run it does not beat the loss ({listed}): it tells the runs apart, and is not shown to "
        f"follow {score} over training."
    )
