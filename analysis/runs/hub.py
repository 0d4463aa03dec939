"""HF Hub repositories whose branches are intermediate checkpoints (Pythia, OLMo, OLMoE).

A checkpoint from the hub has ``path = "hf://<repo_id>@<revision>"`` and ``revision`` set; it is
loaded with ``from_pretrained(repo_id, revision=revision)``. Its fingerprint is
``<repo_id>@<commit sha>`` when the branch listing gives the commit (a moved branch then
invalidates cached results), else ``<repo_id>@<revision>`` (checkpoint branches are not
rewritten in practice).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable

from analysis.runs.base import Checkpoint
from analysis.runs.local import parse_step_name

HF_PREFIX = "hf://"
# Characters that only a regular expression uses: a filter holding one is a regex, else a glob.
_REGEX_ONLY = re.compile(r"[\^$()+{}|\\]")


def parse_revision(ref: str) -> tuple[int, int | None] | None:
    """Parse a checkpoint branch name into ``(step, tokens)``; None for ``main`` and other names.

    ``"step1000"`` (Pythia) -> (1000, None); ``"step5000-tokens20B"`` (OLMo, OLMoE) ->
    (5000, 20_000_000_000); ``"step1000-tokens4194M"`` -> (1000, 4_194_000_000);
    ``"stage1-step1000-tokens5B"`` (OLMo 2) -> (1000, 5_000_000_000).
    """
    ref = ref.strip()
    if not ref or ref.isdigit():
        return None  # a bare number is not a checkpoint branch name on the hub
    return parse_step_name(ref)


def parse_hub_path(source: str) -> tuple[str, str | None]:
    """``"hf://org/model"`` -> ``("org/model", None)``; ``"hf://org/model@step1000"`` -> ``("org/model", "step1000")``.

    Raises ValueError for an empty repository id.
    """
    rest = source.strip()
    rest = rest[len(HF_PREFIX) :] if rest.startswith(HF_PREFIX) else rest
    repo_id, _, revision = rest.partition("@")
    repo_id = repo_id.strip().strip("/")
    if not repo_id:
        raise ValueError(f"{source}: no repository id; write it as hf://org/model")
    return repo_id, revision.strip() or None


def _list_refs(repo_id: str) -> list[tuple[str, str | None]]:
    """(branch or tag name, commit sha) for every branch and tag of a hub model repository."""
    from huggingface_hub import list_repo_refs
    from huggingface_hub.errors import HTTPError

    try:
        refs = list_repo_refs(repo_id)
    except (OSError, ValueError, HTTPError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"cannot list revisions of {repo_id}: {first}; name them with --revisions step1000,step2000 "
            "(or a file with one name a line), or check your connection"
        ) from None
    found = [(ref.name, getattr(ref, "target_commit", None)) for ref in (refs.branches or [])]
    found += [(ref.name, getattr(ref, "target_commit", None)) for ref in (getattr(refs, "tags", None) or [])]
    return found


def revision_matcher(pattern: str) -> Callable[[str], bool]:
    """A test of revision names for ``--revision-filter``: a glob, or a regular expression.

    ``re:`` forces a regex; otherwise a pattern with a regex-only character (``^ $ ( ) + { } | \\``) is a
    regex, searched anywhere in the name (``step\\d+000$``), and anything else a glob matched against the
    whole name (``step*000``, ``stage1-*``). Raises ValueError for an empty pattern or a broken regex.
    """
    text = pattern.strip()
    if not text:
        raise ValueError("--revision-filter is empty: give a glob such as 'step*000' or a regex such as 're:^step'")
    if text.startswith("re:") or _REGEX_ONLY.search(text):
        body = text.removeprefix("re:")
        try:
            compiled = re.compile(body)
        except re.error as err:
            raise ValueError(f"--revision-filter {pattern!r}: not a valid regular expression ({err})") from None
        return lambda name: compiled.search(name) is not None
    return lambda name: fnmatch.fnmatchcase(name, text)


def hub_checkpoints(
    repo_id: str, refs: list[str] | None = None, revision_filter: str | None = None
) -> list[Checkpoint]:
    """The checkpoints of a hub repository, one per step-named branch, sorted by step.

    With ``refs`` None the branches and tags are listed online (raises ValueError with one
    line when that fails); otherwise only the given names are parsed and nothing is
    contacted. ``revision_filter`` (:func:`revision_matcher`) keeps only the names it matches;
    one that matches none raises ValueError naming a few of the names there are.
    ``main`` and names without a step are ignored. When two names give the same step, the
    one with more tokens is kept (then the first in name order).
    """
    repo_id, _ = parse_hub_path(repo_id)
    # A broken filter fails here, before the repository is listed online.
    keep = revision_matcher(revision_filter) if revision_filter is not None else None
    named = _list_refs(repo_id) if refs is None else [(ref.strip(), None) for ref in refs]
    if keep is not None:
        kept = [(ref, commit) for ref, commit in named if keep(ref)]
        if not kept:
            some = ", ".join(sorted(ref for ref, _ in named)[:5]) or "none"
            raise ValueError(
                f"{HF_PREFIX}{repo_id}: no revision matches --revision-filter {revision_filter!r} "
                f"({len(named)} revisions, e.g. {some})"
            )
        named = kept
    best: dict[int, Checkpoint] = {}
    for ref, commit in sorted(dict(named).items()):
        parsed = parse_revision(ref)
        if parsed is None:
            continue
        step, tokens = parsed
        checkpoint = Checkpoint(
            step=step,
            path=f"{HF_PREFIX}{repo_id}@{ref}",
            tokens=tokens,
            fingerprint=f"{repo_id}@{commit or ref}",
            revision=ref,
        )
        earlier = best.get(step)
        if earlier is None or (tokens or 0) > (earlier.tokens or 0):
            best[step] = checkpoint
    return [best[step] for step in sorted(best)]
