"""Learning-rate schedule phases on synthetic schedules with known phase boundaries."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis.schedule import decay_notes, decay_sentence, lr_metric, run_phases, schedule_phases

STEPS = np.arange(0, 1001)
PEAK = 3e-4


def wsd(warmup: int = 50, decay_from: int = 800) -> np.ndarray:
    """Linear warmup, constant, then linear decay to zero over the last steps."""
    lr = np.full(len(STEPS), PEAK)
    lr[:warmup] = PEAK * (STEPS[:warmup] + 1) / warmup
    tail = decay_from <= STEPS
    lr[tail] = PEAK * (1 - (STEPS[tail] - decay_from) / (STEPS[-1] - decay_from))
    return lr


def cosine(warmup: int = 50) -> np.ndarray:
    lr = PEAK * 0.5 * (1 + np.cos(np.pi * np.clip((STEPS - warmup) / (STEPS[-1] - warmup), 0, 1)))
    lr[:warmup] = PEAK * (STEPS[:warmup] + 1) / warmup
    return lr


def bounds(phases: pd.DataFrame) -> dict[str, tuple[float, float]]:
    return {p.phase: (p.start_step, p.end_step) for p in phases.itertuples()}


def test_wsd_has_all_three_phases_where_they_were_planted() -> None:
    found = bounds(schedule_phases(STEPS, wsd()))
    assert list(found) == ["warmup", "stable", "decay"]
    assert found["warmup"][0] == 0 and 45 <= found["warmup"][1] <= 50
    assert 800 <= found["decay"][0] <= 815 and found["decay"][1] == 1000
    assert found["stable"] == (found["warmup"][1], found["decay"][0])


def test_cosine_decays_from_the_end_of_warmup_with_no_stable_phase() -> None:
    found = bounds(schedule_phases(STEPS, cosine()))
    assert list(found) == ["warmup", "decay"]
    assert found["decay"][0] == found["warmup"][1] and 45 <= found["decay"][0] <= 50


def test_constant_schedule_has_no_decay() -> None:
    assert list(schedule_phases(STEPS, np.full(len(STEPS), PEAK))["phase"]) == ["stable"]
    warm = np.minimum(PEAK, PEAK * (STEPS + 1) / 10)  # the demo runs' schedule: 10 warmup steps, then flat
    assert list(schedule_phases(STEPS, warm)["phase"]) == ["warmup", "stable"]


def test_noise_and_spikes_do_not_split_or_invent_phases() -> None:
    rng = np.random.default_rng(0)
    noisy = wsd() * (1 + 0.01 * rng.standard_normal(len(STEPS)))
    noisy[[300, 301, 600]] = [0.0, 0.0, 3 * PEAK]  # logging glitches
    found = bounds(schedule_phases(STEPS, noisy))
    assert list(found) == ["warmup", "stable", "decay"]
    assert 790 <= found["decay"][0] <= 820
    flat = PEAK * (1 + 0.01 * rng.standard_normal(len(STEPS)))
    assert "decay" not in set(schedule_phases(STEPS, flat)["phase"])


def test_unordered_duplicated_and_sparse_logs() -> None:
    order = np.random.default_rng(1).permutation(len(STEPS))
    shuffled = schedule_phases(np.concatenate([STEPS[order], [500]]), np.concatenate([wsd()[order], [PEAK]]))
    assert bounds(shuffled) == bounds(schedule_phases(STEPS, wsd()))
    sparse = STEPS[::100]  # 11 logged points: the warmup is seen at step 0 only
    assert bounds(schedule_phases(sparse, wsd()[::100])) == {
        "warmup": (0, 100), "stable": (100, 800), "decay": (800, 1000),
    }  # fmt: skip


@pytest.mark.parametrize(("steps", "lr"), [([], []), ([1, 2], [1e-3, 1e-3]), ([1, 2, 3], [0, 0, 0])])
def test_too_short_or_zero_rates_give_no_phases(steps, lr) -> None:
    out = schedule_phases(steps, lr)
    assert out.empty and list(out.columns) == ["phase", "start_step", "end_step", "lr_start", "lr_end"]


def test_non_finite_values_are_dropped() -> None:
    lr = wsd().copy()
    lr[::7] = np.nan
    assert list(schedule_phases(STEPS, lr)["phase"]) == ["warmup", "stable", "decay"]


@pytest.mark.parametrize(
    ("steps", "lr", "options", "message"),
    [
        ([1, 2, 3], [1.0, 2.0], {}, "3 steps but 2 learning rates"),
        ([1, 2, 3], [1.0, -2.0, 1.0], {}, "negative learning rate -2 at step 2"),
        ([1, 2, 3], ["a", "b", "c"], {}, "not numeric"),
        ([1, 2, 3], [1.0, 1.0, 1.0], {"tol": 0.0}, "tol=0.0"),
        ([1, 2, 3], [1.0, 1.0, 1.0], {"min_stable": -1}, "min_stable=-1"),
    ],
)
def test_bad_input_is_one_clear_line(steps, lr, options, message) -> None:
    with pytest.raises(ValueError, match=message) as err:
        schedule_phases(steps, lr, **options)
    assert "\n" not in str(err.value)


def test_lr_metric_is_found_by_its_name() -> None:
    assert lr_metric(["train/loss", "train/learning_rate", "optim/lr"]) == "train/learning_rate"
    assert lr_metric(["train/loss", "optim/lr"]) == "optim/lr"
    assert lr_metric(["train/loss", "lr-AdamW"]) == "lr-AdamW"
    assert lr_metric(["train/loss", "train/lr_scale_factor", "eval/accuracy"]) is None


def long_log(run: str, lr: np.ndarray) -> pd.DataFrame:
    log = pd.DataFrame({"run": run, "step": STEPS, "tokens": STEPS * 1000, "metric": "train/lr", "value": lr})
    loss = log.assign(metric="train/loss", value=3.0)
    return pd.concat([log, loss], ignore_index=True)


def test_run_phases_per_run_on_the_tokens_axis_and_the_decay_note() -> None:
    frame = pd.concat([long_log("wsd", wsd()), long_log("flat", np.full(len(STEPS), PEAK))], ignore_index=True)
    frame = pd.concat([frame, pd.DataFrame({"run": ["nolog"], "step": [1], "metric": ["train/loss"], "value": [1]})])
    phases = run_phases(frame, x="tokens")
    assert set(phases["run"]) == {"wsd", "flat"}
    decay = phases[(phases["run"] == "wsd") & (phases["phase"] == "decay")].iloc[0]
    assert decay["start"] == decay["start_step"] * 1000 and decay["end"] == 1_000_000
    assert "decay" not in set(phases.loc[phases["run"] == "flat", "phase"])
    windows = pd.DataFrame(
        {"run": ["wsd", "wsd", "flat"], "start": [100_000, 700_000, 700_000], "end": [300_000, 900_000, 900_000]}
    )
    notes = decay_notes(windows, phases)
    assert notes[0] == "" and notes[2] == ""  # before the decay; a constant schedule never decays
    assert notes[1].startswith("overlaps the lr decay (") and notes[1].endswith(" to 900000)")


def test_run_phases_needs_the_long_table_and_a_known_axis() -> None:
    with pytest.raises(ValueError, match="long table"):
        run_phases(pd.DataFrame({"step": [1]}))
    with pytest.raises(ValueError, match="x-axis 'epoch'"):
        run_phases(long_log("a", wsd()), x="epoch")
    assert run_phases(long_log("a", wsd()).drop(columns="tokens"), x="tokens").empty  # no tokens: no bands


def test_decay_sentence_counts_the_overlapping_windows() -> None:
    assert decay_sentence(["", ""]) == ""
    assert decay_sentence(["", "overlaps the lr decay (1 to 2)"]).startswith("One window overlaps a learning-rate")
    assert decay_sentence(["a", "b", ""]).startswith("2 windows overlap")


def test_the_report_shades_the_decay_and_notes_the_window_inside_it(divergence_db) -> None:
    from analysis.report import build_report
    from analysis.store import Store
    from tests.test_app_dashboard import add_lr_log

    add_lr_log(divergence_db, "grok", decay_from=70)
    add_lr_log(divergence_db, "stuck", decay_from=None)
    report = build_report(Store(divergence_db), ["grok", "stuck"])
    curves = next(f.figure for f in report.figures if f.key == "curves")
    assert [t.name for t in curves.data if t.name.startswith("lr ")] == ["lr warmup · grok, stuck", "lr decay · grok"]
    windows = report.section("windows")
    assert any(t.startswith("One window overlaps a learning-rate decay") for t in windows.text)
    table = windows.tables[0].frame
    assert table.loc[table["run"] == "grok", "lr_schedule"].str.startswith("overlaps the lr decay").all()
