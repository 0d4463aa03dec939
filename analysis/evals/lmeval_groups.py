"""Group scores a result file lacks, derived at import from its subtasks (the MMLU average over its subjects)."""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass

from analysis.evals.lmeval_results import EvalRow


@dataclass(frozen=True)
class DerivedRow:
    """A group score computed at import from its subtasks' rows: ``row`` plus how it was derived."""

    row: EvalRow
    note: str  # "mean of 57 hendrycksTest-* subjects"
    subjects: int


# The 57 MMLU subjects (Hendrycks et al.), as lm-eval names them after ``hendrycksTest-`` (0.3) or ``mmlu_`` (0.4).
MMLU_SUBJECTS = frozenset(
    [
        "abstract_algebra",
        "anatomy",
        "astronomy",
        "business_ethics",
        "clinical_knowledge",
        "college_biology",
        "college_chemistry",
        "college_computer_science",
        "college_mathematics",
        "college_medicine",
        "college_physics",
        "computer_security",
        "conceptual_physics",
        "econometrics",
        "electrical_engineering",
        "elementary_mathematics",
        "formal_logic",
        "global_facts",
        "high_school_biology",
        "high_school_chemistry",
        "high_school_computer_science",
        "high_school_european_history",
        "high_school_geography",
        "high_school_government_and_politics",
        "high_school_macroeconomics",
        "high_school_mathematics",
        "high_school_microeconomics",
        "high_school_physics",
        "high_school_psychology",
        "high_school_statistics",
        "high_school_us_history",
        "high_school_world_history",
        "human_aging",
        "human_sexuality",
        "international_law",
        "jurisprudence",
        "logical_fallacies",
        "machine_learning",
        "management",
        "marketing",
        "medical_genetics",
        "miscellaneous",
        "moral_disputes",
        "moral_scenarios",
        "nutrition",
        "philosophy",
        "prehistory",
        "professional_accounting",
        "professional_law",
        "professional_medicine",
        "professional_psychology",
        "public_relations",
        "security_studies",
        "sociology",
        "us_foreign_policy",
        "virology",
        "world_religions",
    ]
)
# group name -> (subtask prefix, its subjects). 0.4's ``mmlu_stem`` & co. are groups, not subjects: the
# subject list keeps them (and other ``mmlu_*`` variants) out of the mean.
GROUPS = {"mmlu": (("hendrycksTest-", MMLU_SUBJECTS), ("mmlu_", MMLU_SUBJECTS))}


def group_means(rows: list[EvalRow], present: Collection[str] = frozenset()) -> tuple[list[DerivedRow], list[str]]:
    """Group scores a result file lacks, from its subtasks: ``(derived rows, one-line notes)``.

    For each known group (MMLU: ``hendrycksTest-<subject>`` in 0.3 files, ``mmlu_<subject>`` in 0.4)
    whose subtasks are in ``rows`` but whose own row is not (nor in ``present``, the file's ``groups``):
    per metric, the **unweighted mean over the subjects present in the file**, as lm-eval's older
    aggregate and the usual "MMLU average" do (lm-eval 0.4's own ``mmlu`` row weights subjects by
    their size, so it is a different number, kept apart by the ``derived`` parameter). The rule needs
    no particular number of subjects: a file with 4 of the 57 gives the mean of those 4, and
    ``DerivedRow.subjects`` says how many. A metric is derived only when every subject present has
    it, all with the same shot count; its stderr is sqrt(sum se_i^2) / k (subjects independent),
    or None when any subject lacks one; ``n`` is the subjects' total when all say it.
    """
    derived: list[DerivedRow] = []
    notes: list[str] = []
    have = {row.task for row in rows} | set(present)
    for group, families in GROUPS.items():
        if group in have:
            continue
        found = []
        for prefix, subjects in families:
            mine = [r for r in rows if r.task.startswith(prefix) and r.task[len(prefix) :] in subjects]
            if mine:
                found.append((prefix, mine))
        if len(found) != 1:
            if found:
                names = " and ".join(f"{prefix}*" for prefix, _ in found)
                notes.append(f"both {names} subtasks; no {group} mean derived (import them from separate files)")
            continue
        prefix, mine = found[0]
        tasks = sorted({r.task for r in mine})
        by_metric: dict[str, dict[str, EvalRow]] = {}
        for r in mine:
            by_metric.setdefault(r.metric, {})[r.task] = r
        for metric, per_task in sorted(by_metric.items()):
            if len(per_task) != len(tasks) or len({r.n_shot for r in per_task.values()}) != 1:
                continue
            parts = [per_task[t] for t in tasks]
            k = len(parts)
            errs = [r.stderr for r in parts if r.stderr is not None]
            sizes = [r.n for r in parts if r.n is not None]
            better = {r.higher_is_better for r in parts}
            row = EvalRow(
                task=group,
                metric=metric,
                value=sum(r.value for r in parts) / k,
                stderr=math.sqrt(sum(e * e for e in errs)) / k if len(errs) == k else None,
                n=sum(sizes) if len(sizes) == k else None,
                n_shot=parts[0].n_shot,
                task_version=None,
                higher_is_better=better.pop() if len(better) == 1 else None,
            )
            derived.append(DerivedRow(row, f"mean of {k} {prefix}* subjects", k))
    return derived, notes
