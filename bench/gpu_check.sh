#!/usr/bin/env bash
# The GPU check: one prepared run of everything that has a device path, for a machine lent with a GPU
# for a few minutes. It never needs the network.
#
#   bench/gpu_check.sh [--device cuda|cuda:N|cpu] [--quick] [--budget SECONDS] [--out DIR]
#   make gpu-check                       (the same, after make setup)
#
# On a GPU (the default, --device cuda) it first checks that nvidia-smi and torch see one, and exits
# with one line (status 2) if not. Then it runs each step under its own timeout, carrying on past a
# failed or timed-out step:
#   tests           the device-aware metric tests (pytest -m device --device cuda), no -x
#   hvp             python -m bench.hvp             Hessian-vector product against a gradient
#   mc_scoring      python -m bench.mc_scoring      one-pass against lm-eval scoring, in bfloat16
#   checkpoint_cost python -m bench.checkpoint_cost every metric at Pythia-160m size (forwards in the stored bf16)
#   pathways        python -m bench.pathways        pathway metrics against the forward pass
#   eigen           python -m bench.eigen_convergence  products to convergence on 2 tiny exact models
#                   (the demo checkpoints are not there: they are trained, not shipped)
# and writes DIR/gpu_report.md (machine, versions, date, each step's exit code and wall time, the end
# of its output) with each step's full output in DIR/steps/ and raw results (JUnit XML, JSON) in
# DIR/raw/. DIR is --out, else $OUT, else out/gpu.
#
# The step timeouts add up to --budget (default 450 s, about 8 minutes with start-up on an H200).
# --quick runs every step at a tiny size; --device cpu is the dry run: no GPU check, everything on
# the CPU (use it with --quick to check the script on a machine without a GPU).
# Exit status: 0 when every step passed, 1 when one failed or timed out, 2 when there is no GPU.
set -u -o pipefail

device=cuda
quick=0
budget=450
out="${OUT:-}"
while [ $# -gt 0 ]; do
    case "$1" in
        --device) device="${2:?--device needs a value: cuda, cuda:N or cpu}"; shift 2 ;;
        --device=*) device="${1#*=}"; shift ;;
        --quick) quick=1; shift ;;
        --budget) budget="${2:?--budget needs a number of seconds}"; shift 2 ;;
        --budget=*) budget="${1#*=}"; shift ;;
        --out) out="${2:?--out needs a folder}"; shift 2 ;;
        --out=*) out="${1#*=}"; shift ;;
        -h|--help) sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check: unknown argument '$1'; see bench/gpu_check.sh --help" >&2; exit 64 ;;
    esac
done
case "$device" in
    cpu|cuda|cuda:[0-9]|cuda:[0-9][0-9]) ;;
    *) echo "gpu_check: --device $device: use cuda, cuda:N or cpu (the CPU dry run)" >&2; exit 64 ;;
esac
if ! [[ "$budget" =~ ^[0-9]+$ ]] || [ "$budget" -lt 10 ]; then
    echo "gpu_check: --budget $budget: give a whole number of seconds, at least 10" >&2; exit 64
fi

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root" || exit 1
out="${out:-$root/out/gpu}"
mkdir -p "$out/steps" "$out/raw" || { echo "gpu_check: cannot write to $out" >&2; exit 1; }
out="$(cd "$out" && pwd)"
report="$out/gpu_report.md"

# The project's venv when there is one (make setup), else whatever python3 is on PATH; $PYTHON wins.
if [ -n "${PYTHON:-}" ]; then py="$PYTHON"
elif [ -x "$root/.venv/bin/python" ]; then py="$root/.venv/bin/python"
else py="$(command -v python3 || echo python3)"
fi
case "$py$out" in
    *[[:space:]]*) echo "gpu_check: $py or $out has a space in it; the step commands split on spaces" >&2; exit 64 ;;
esac
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1  # a step killed at its timeout still leaves what it printed

no_gpu() {
    local line="gpu_check: no GPU: $1"
    echo "$line" >&2
    printf '# GPU check: not run\n\n%s (%s)\n' "$line" "$(date -u '+%Y-%m-%d %H:%M:%S UTC')" > "$report"
    exit 2
}
if ! "$py" -c "import torch" 2>/dev/null; then
    no_gpu "$py cannot import torch; run make setup (or set PYTHON) first"
fi
if [ "$device" != cpu ]; then
    command -v nvidia-smi >/dev/null || no_gpu "nvidia-smi not found (for a dry run on the CPU: --device cpu --quick)"
    nvidia-smi -L >/dev/null 2>&1 || no_gpu "nvidia-smi -L fails: $(nvidia-smi -L 2>&1 | head -n 1)"
    why="$("$py" -c "
import torch
if torch.version.cuda is None:
    print(f'torch {torch.__version__} is a CPU build; install a CUDA build of torch')
elif not torch.cuda.is_available():
    print(f'torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU: torch.cuda.is_available() is False')
elif torch.device('$device').index is not None and torch.device('$device').index >= torch.cuda.device_count():
    print(f'$device asked, but torch sees {torch.cuda.device_count()} GPU(s)')
" 2>&1 | tail -n 1)"
    [ -z "$why" ] || no_gpu "$why"
fi

# --- the steps: name, share of the budget (percent), command ------------------------------------------
if [ "$device" = cpu ]; then dtype=float32; else dtype=bfloat16; fi
tests=(tests/test_metrics_flatness.py tests/test_metrics_pathways.py tests/test_metrics_alignment.py
       tests/test_evals_heldout.py)
names=(tests hvp mc_scoring checkpoint_cost pathways eigen)
# Shares from the full run's expected costs on an H200 host (each step starts torch and CUDA afresh;
# checkpoint_cost ten times; pathways' NumPy baseline runs on the CPU): the 4% left covers this script.
shares=(22 7 15 34 10 8)
if [ "$quick" = 1 ]; then
    cmds=(
        "$py -m pytest -p no:cacheprovider -q -rfEs -m device --device $device --timeout 60 --durations 10 --junitxml $out/raw/tests.xml ${tests[*]}"
        "$py -m bench.hvp --device $device --hidden 32 --batch 2 --seq 8"
        "$py -m bench.mc_scoring --device $device --dtype $dtype --docs 2 --repeats 1 --width 64 --layers 1 --vocab 0"
        "$py -m bench.checkpoint_cost --device $device --quick --json $out/raw/checkpoint_cost.json"
        "$py -m bench.pathways --device $device --samples 200 --batch 50 --repeats 1"
        "$py -m bench.eigen_convergence --device $device --steps 0 --tiny 1 --seeds 1 --json $out/raw/eigen.json"
    )
else
    cmds=(
        "$py -m pytest -p no:cacheprovider -q -rfEs -m device --device $device --timeout 60 --durations 10 --junitxml $out/raw/tests.xml ${tests[*]}"
        "$py -m bench.hvp --device $device"
        "$py -m bench.mc_scoring --device $device --dtype $dtype"
        "$py -m bench.checkpoint_cost --device $device --json $out/raw/checkpoint_cost.json"
        "$py -m bench.pathways --device $device"
        "$py -m bench.eigen_convergence --device $device --steps 0 --tiny 2 --seeds 1 --json $out/raw/eigen.json"
    )
fi

started="$(date -u '+%Y-%m-%d %H:%M:%S UTC')"
t0=$EPOCHREALTIME
codes=() walls=() limits=()
for i in "${!names[@]}"; do
    limit=$(( budget * shares[i] / 100 ))
    [ "$limit" -ge 5 ] || limit=5
    log="$out/steps/$((i + 1))-${names[i]}.log"
    echo "gpu_check: ${names[i]} (timeout ${limit} s)" >&2
    begin=$EPOCHREALTIME
    # timeout signals the step's whole process group, so subprocesses (checkpoint_cost's) end with it.
    # shellcheck disable=SC2086  # the commands are word lists
    timeout --kill-after=10 "$limit" ${cmds[i]} > "$log" 2>&1
    code=$?
    wall=$(awk -v a="$begin" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
    codes+=("$code") walls+=("$wall") limits+=("$limit")
    echo "gpu_check: ${names[i]} exit $code after $wall s" >&2
done
total=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.0f", b - a }')

# --- the report ----------------------------------------------------------------------------------------
outcome() {
    case "$1" in
        0) echo passed ;;
        124|137) echo "timed out" ;;
        *) echo failed ;;
    esac
}
failed=0
{
    mode="full size"; [ "$quick" = 1 ] && mode="quick (tiny sizes)"
    kind="GPU run"; [ "$device" = cpu ] && kind="CPU dry run"
    echo "# GPU check: $kind on $device, $mode"
    echo
    echo "- started: $started; all steps took $total s (budget $budget s)"
    echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (with uncommitted changes)')"
    echo "- host: $(uname -n), $(uname -sr), $(nproc 2>/dev/null || echo '?') CPUs"
    echo "- python: $py"
    echo
    echo "## Versions"
    echo
    echo '```'
    "$py" - "$device" <<'EOF' 2>&1
import sys
import platform

import torch

print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}")
for name in ("transformers", "lm_eval", "numpy"):
    try:
        print(f"{name} {__import__(name).__version__}")
    except Exception as err:  # a missing package is worth a line in the report, not a crash
        print(f"{name}: {type(err).__name__}: {err}")
if sys.argv[1] != "cpu":
    device = torch.device(sys.argv[1])
    props = torch.cuda.get_device_properties(device)
    print(f"{device}: {props.name}, compute capability {props.major}.{props.minor}, "
          f"{props.total_memory / 2**30:.1f} GiB, {props.multi_processor_count} SMs; "
          f"{torch.cuda.device_count()} GPU(s) visible; bf16 supported: {torch.cuda.is_bf16_supported()}")
EOF
    echo '```'
    echo
    echo "## nvidia-smi"
    echo
    echo '```'
    if command -v nvidia-smi >/dev/null; then nvidia-smi 2>&1; else echo "nvidia-smi: not found"; fi
    echo '```'
    echo
    echo "## Steps"
    echo
    echo "| step | exit code | result | wall s | timeout s | full output |"
    echo "| --- | ---: | --- | ---: | ---: | --- |"
    for i in "${!names[@]}"; do
        [ "${codes[i]}" = 0 ] || failed=$((failed + 1))
        echo "| ${names[i]} | ${codes[i]} | $(outcome "${codes[i]}") | ${walls[i]} | ${limits[i]} | steps/$((i + 1))-${names[i]}.log |"
    done
    echo
    echo "$(( ${#names[@]} - failed )) of ${#names[@]} steps passed."
    for i in "${!names[@]}"; do
        echo
        echo "### ${names[i]}: exit ${codes[i]} ($(outcome "${codes[i]}")), ${walls[i]} s"
        echo
        echo "\`${cmds[i]}\`"
        echo
        echo "Last 30 lines of steps/$((i + 1))-${names[i]}.log:"
        echo
        echo '```'
        tail -n 30 "$out/steps/$((i + 1))-${names[i]}.log"
        echo '```'
    done
} > "$report"
echo "gpu_check: $(( ${#names[@]} - failed )) of ${#names[@]} steps passed in $total s; report: $report" >&2
[ "$failed" = 0 ]
