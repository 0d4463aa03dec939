"""Which role a metric can play in the divergence views, read from its name.

A metric is a loss (logged, held-out, or one of lm-eval's perplexities), a downstream score (an lm-eval
result ``task/metric,filter`` or a logged accuracy), or a signal that may predict a score (everything else
that is not schedule bookkeeping). The pages use these lists to offer sensible defaults; the predictor
ranking scores the signals.
"""

from __future__ import annotations

from collections.abc import Sequence

# Logged bookkeeping that is not a signal about the model (the schedule predicts everything monotone).
_NOT_SIGNALS = {"lr", "learning_rate", "epoch", "step", "tokens", "samples", "global_step", "runtime", "time"}

_CONTINUOUS = {"p_correct", "margin", "nll_per_token"}  # analysis.evals.continuous: a score's smooth counterparts


def signal_metrics(metrics: Sequence[str], downstream_metric: str) -> list[str]:
    """The metrics that can predict ``downstream_metric``: what the ranking scores by default.

    Every metric but the target, lm-eval scores (``task/metric,filter``) and schedule bookkeeping; a task's
    continuous counterparts (``task/p_correct,none``, ...) are signals and stay in.
    """
    out = []
    for metric in sorted(set(metrics)):
        leaf = metric.rsplit("/", 1)[-1]
        continuous = "," in leaf and leaf.split(",", 1)[0] in _CONTINUOUS
        if metric == downstream_metric or ("," in metric and not continuous) or leaf.lower() in _NOT_SIGNALS:
            continue
        out.append(metric)
    return out


# The training loss first: "does the pretraining loss still tell the truth?" is asked of the loss the run
# optimises; a logged evaluation loss next.
_LOSS_PREFERENCE = ("train/loss", "eval/loss")
# lm-eval's loss-like metrics (lower is better; ``task/<metric>,<filter>``), in the order offered as a loss after
# the logged and held-out losses: a run known only from result files (Pythia's sweeps carry lambada_openai
# perplexity) still has a loss side.
_EVAL_LOSSES = ("bits_per_byte", "byte_perplexity", "word_perplexity", "perplexity", "ppl")


def _eval_loss_rank(name: str) -> int | None:
    """The place of an lm-eval loss-like metric in ``_EVAL_LOSSES``, or None for any other name."""
    if "/" not in name or "," not in name:
        return None
    metric = name.rsplit("/", 1)[-1].split(",", 1)[0]
    return _EVAL_LOSSES.index(metric) if metric in _EVAL_LOSSES else None


def loss_metrics(names: Sequence[str]) -> list[str]:
    """Metrics that are a loss, the preferred first: logged losses, held-out losses, then lm-eval's loss-like
    metrics (``bits_per_byte``, ``byte_perplexity``, ``word_perplexity``, ``perplexity``, ``ppl``)."""
    names = list(dict.fromkeys(names))
    losses = [n for n in names if n in _LOSS_PREFERENCE or n.endswith(("/heldout_loss", "/loss"))]
    losses = sorted(
        losses, key=lambda n: (n not in _LOSS_PREFERENCE, _LOSS_PREFERENCE.index(n) if n in _LOSS_PREFERENCE else 0, n)
    )
    evals = [n for n in names if n not in losses and _eval_loss_rank(n) is not None]
    return losses + sorted(evals, key=lambda n: (_eval_loss_rank(n), n))


def downstream_metrics(names: Sequence[str]) -> list[str]:
    """Metrics that are a downstream score: lm-eval results (``task/metric,filter``) and logged held-out accuracies
    (``eval/accuracy``; not ``train/accuracy``).

    lm-eval's loss-like metrics (perplexities, bits per byte) come last: they are offered as a loss
    (``loss_metrics``), so the default score is a real one whenever the runs have any. So do the fine-tune
    probe's (``finetune/<task>/...``): they score a fine-tuned copy, not the checkpoint itself.
    """
    names = list(dict.fromkeys(names))
    scores = [
        n
        for n in names
        if ("," in n and "/" in n and "stderr" not in n) or (n.endswith("/accuracy") and not n.startswith("train/"))
    ]  # a logged training accuracy measures fitting, not downstream ability
    return sorted(scores, key=lambda n: (_eval_loss_rank(n) is not None, n.startswith("finetune/"), "," not in n, n))


def accuracy_first(scores: Sequence[str]) -> list[str]:
    """Downstream scores with accuracies first (``task/acc,...``, then logged ``.../accuracy``), each once: the
    score a page or report opens on, since an accuracy is what a reader of the chart expects to see rise. The
    fine-tune probe's scores never come first: they score a fine-tuned copy, not the checkpoint."""
    own = [m for m in scores if not m.startswith("finetune/")]
    order = [m for m in own if "/acc," in m] + [m for m in own if m.endswith("/accuracy")] + list(scores)
    return list(dict.fromkeys(order))
