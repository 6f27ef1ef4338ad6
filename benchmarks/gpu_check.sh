#!/usr/bin/env bash
# One command for a GPU machine: the GPU tests, `kdlib bench` (engine eager and graphed vs the reference
# pipeline) and `kdlib bench --paper-run` (240-epoch projection), bf16 and fp32 side by side, into one JSON.
#
#   bash benchmarks/gpu_check.sh [OUTPUT.json]      (default: $OUT/gpu_check.json, else ./gpu_check.json)
#
# Runs from a plain copy of the working tree: PYTHONPATH=., python3, nothing installed, no network; needs the
# machine's own PyTorch with CUDA (written against 2.11 + CUDA 13) and torchvision, numpy, pytest, tqdm,
# pyyaml, pillow: the first step checks them and names what is missing, before any time is spent.
# The JSON is rewritten after every part, so a part killed by its limit leaves the earlier ones; every
# part's output is unbuffered (PYTHONUNBUFFERED=1) and its log tail kept.
#
# Budget: under 8 minutes in all (GPU_CHECK_BUDGET, default 470 s). Each part has a limit and a minimum;
# a part starts only if its minimum fits in what is left, and gets at most what is left:
#   part         limit  minimum  expected on one H100/H200 (margin: the rest of the limit)
#   prerequisites  20      -     ~5 s (imports, CUDA init)
#   tests         170     60     ~100 s (GPU tests; per-test outcomes from the junit XML)
#   bench_bf16     60     30     ~35 s (200 steps x 5 repeats x 4 variants, bf16 kdlib figures)
#   bench_fp32     60     30     ~35 s (the same, fp32)
#   paper_bf16    100     60     ~60 s (teacher 2 + student 3 paper-size epochs, graph=auto, amp=auto: bf16)
#   paper_fp32    100     60     ~70 s (the same, amp=none), dropped first when the budget runs short
# The goals (graphed >= 45k img/s, >= 5x the reference, >= 4x eager; 240-epoch student <= 6 min, teacher
# <= 15 min) were set from bf16 figures: they are judged on the bf16 parts, the fp32 ones stand beside.
#
# GPU_CHECK_MODE: gpu (default) | smoke (on a CPU, tiny sizes: checks the plumbing with the real commands)
# | dry (stand-in commands, no training: checks this script's own logic; the CPU test suite runs it).
# The commit: `git rev-parse HEAD` where .git exists, else GPU_CHECK_COMMIT and GPU_CHECK_DIRTY (set them
# when the tree was copied without .git); the sha256 of the sources is recorded either way.
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
MODE="${GPU_CHECK_MODE:-gpu}"
PY="${PYTHON:-python3}"
DEST="${1:-${OUT:-.}/gpu_check.json}"
BUDGET="${GPU_CHECK_BUDGET:-470}"
START=$(date +%s)
WORK="$(mktemp -d)"
export KDLIB_HOME="$WORK/kdlib_home" MPLCONFIGDIR="$WORK/mpl"
export KDLIB_TEST_THREADS="${KDLIB_TEST_THREADS:-4}"
PARTS=""

case "$MODE" in gpu|smoke|dry) ;; *) echo "GPU_CHECK_MODE must be gpu, smoke or dry, got '$MODE'" >&2; exit 2;; esac
if ! command -v "$PY" >/dev/null 2>&1; then
  echo "[gpu_check] missing: $PY (set PYTHON to the machine's python with torch)" >&2
  mkdir -p "$(dirname "$DEST")"
  printf '{"mode": "%s", "error": "missing: %s"}\n' "$MODE" "$PY" >"$DEST"
  exit 3
fi

report() {  # rewrite the JSON from what the parts left in $WORK
  "$PY" - "$WORK" "$DEST" "$MODE" "$PARTS" "$START" "$BUDGET" <<'PY'
import datetime, glob, json, os, re, sys, time
import xml.etree.ElementTree as ET
work, dest, mode, parts, start, budget = sys.argv[1:7]

def read(name, default=""):
    try:
        with open(os.path.join(work, name), errors="replace") as f:
            return f.read()
    except OSError:
        return default

def last_json(text):
    for line in reversed(text.strip().splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None

def junit(path, log):
    """Per-test outcomes: the junit XML when pytest wrote it, else the -rA lines of the log (a killed run)."""
    tests = []
    if os.path.isfile(path):
        try:
            for case in ET.parse(path).getroot().iter("testcase"):
                outcome, message = "passed", ""
                for tag in ("failure", "error", "skipped"):
                    node = case.find(tag)
                    if node is not None:
                        outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                        message = (node.get("message") or "")[:300]
                tests.append({"test": f"{case.get('classname', '')}::{case.get('name', '')}", "outcome": outcome,
                              "seconds": float(case.get("time") or 0), "message": message})
            return tests, "junit"
        except ET.ParseError:
            pass
    for m in re.finditer(r"^(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (\S+)", log, re.M):
        tests.append({"test": m.group(2), "outcome": m.group(1).lower(), "seconds": None, "message": ""})
    return tests, "log" if tests else "none"

result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "mode": mode,
          "command": "bash benchmarks/gpu_check.sh", "budget_seconds": int(budget),
          "elapsed_seconds": int(time.time() - int(start)),
          "environment": last_json(read("env.json")) or {"log": read("env.log")[-2000:]}, "parts": {}}
for name in parts.split():
    log = read(name + ".log")
    part = {"status": read(name + ".status", "running").strip(), "exit_code": int(read(name + ".rc", "-1").strip() or -1),
            "seconds": int(read(name + ".seconds", "0").strip() or 0), "limit": int(read(name + ".limit", "0").strip() or 0),
            "command": read(name + ".cmd").strip(), "log_tail": log[-3000:]}
    if name == "tests":
        part["tests"], part["outcomes_from"] = junit(os.path.join(work, "tests.xml"), log)
        part["counts"] = {k: sum(t["outcome"] == k for t in part["tests"]) for k in ("passed", "failed", "error", "skipped")}
    else:
        part["result"] = last_json(log)
        part["amp"] = (part["result"] or {}).get("amp")
    result["parts"][name] = part

def res(name):
    return result["parts"].get(name, {}).get("result") or {}

summary = {"tests_passed": result["parts"].get("tests", {}).get("status") == "ok"}
for prec in ("bf16", "fp32"):
    b, p = res("bench_" + prec), res("paper_" + prec)
    summary[prec] = {"amp": b.get("amp"), "graphed_img_s": b.get("kdlib_graphed_img_s"),
                     "eager_cache_img_s": b.get("kdlib_img_s"), "reference_img_s": b.get("reference_img_s"),
                     "graphed_vs_reference": b.get("speedup_graphed"), "graphed_vs_eager": b.get("graphed_vs_eager"),
                     "graph_counts": b.get("graphed_counts"), "paper_amp": p.get("amp"),
                     "student_240_epochs_minutes": p.get("student_projected_minutes"),
                     "teacher_240_epochs_minutes": p.get("teacher_projected_minutes"),
                     "paper_execution": p.get("execution")}

def goal(value, test):
    return None if value is None else bool(test(value))

s = summary["bf16"]  # the goals were set from bf16 figures
summary["goals_on_bf16"] = {
    "graphed_img_s >= 45000": goal(s["graphed_img_s"], lambda v: v >= 45000),
    "graphed >= 5x reference": goal(s["graphed_vs_reference"], lambda v: v >= 5),
    "graphed >= 4x eager": goal(s["graphed_vs_eager"], lambda v: v >= 4),
    "student <= 6 min": goal(s["student_240_epochs_minutes"], lambda v: v <= 6),
    "teacher <= 15 min": goal(s["teacher_240_epochs_minutes"], lambda v: v <= 15)}
result["summary"] = summary
os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
tmp = dest + ".tmp"
with open(tmp, "w") as f:
    json.dump(result, f, indent=1, default=str)
os.replace(tmp, dest)
PY
}

part() {  # part NAME LIMIT MINIMUM COMMAND...: output to $WORK/NAME.log, then the JSON is rewritten
  local name="$1" limit="$2" minimum="$3"; shift 3
  PARTS="$PARTS $name"
  local left=$(( BUDGET - ($(date +%s) - START) - 5 ))
  echo "$*" >"$WORK/$name.cmd"
  if [ "$left" -lt "$minimum" ]; then
    echo skipped >"$WORK/$name.status"; echo 0 >"$WORK/$name.limit"
    echo "[gpu_check] $name: skipped, ${left}s of the budget left (needs ${minimum}s)" | tee "$WORK/$name.log" >&2
    report; return
  fi
  [ "$left" -lt "$limit" ] && limit="$left"
  echo "$limit" >"$WORK/$name.limit"
  echo "[gpu_check] $name: up to ${limit}s: $*" >&2
  local t0=$(date +%s)
  timeout --signal=TERM --kill-after=10 "$limit" "$@" >"$WORK/$name.log" 2>&1
  local rc=$?
  echo "$rc" >"$WORK/$name.rc"
  echo $(( $(date +%s) - t0 )) >"$WORK/$name.seconds"
  case "$rc" in 0) echo ok;; 124|137) echo timeout;; *) echo failed;; esac >"$WORK/$name.status"
  echo "[gpu_check] $name: $(cat "$WORK/$name.status") (exit $rc) in $(cat "$WORK/$name.seconds") s" >&2
  report
}

# -- prerequisites: name what is missing before any time is spent ------------------------------------------
"$PY" - "$MODE" <<'PY' >"$WORK/env.json" 2>"$WORK/env.log"
import hashlib, importlib, json, os, platform, subprocess, sys
mode = sys.argv[1]
need = ["torch", "torchvision", "numpy", "pytest", "tqdm", "yaml", "PIL"] + os.environ.get("GPU_CHECK_EXTRA_REQUIRE", "").split()
found, missing = {}, []
for name in need:
    try:
        found[name] = getattr(importlib.import_module(name), "__version__", "?")
    except Exception as exc:  # an old torchvision may fail to load its ops against this torch
        missing.append(f"{name} ({type(exc).__name__}: {str(exc)[:200]})")
env = {"python": platform.python_version(), "host": platform.node(), "modules": found, "missing": missing}
if "torch" in found:
    import torch
    env.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(),
               gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
               cpu_capability=torch.backends.cpu.get_cpu_capability())
    if mode == "gpu" and not torch.cuda.is_available():
        missing.append("a CUDA device (torch.cuda.is_available() is False)")
    if "torchvision" in found:
        try:  # the kernels kdlib uses, against this torch
            import torchvision.transforms.v2.functional as TF
            TF.equalize(torch.zeros(1, 3, 4, 4, dtype=torch.uint8))
        except Exception as exc:
            missing.append(f"a torchvision that works with torch {torch.__version__} ({str(exc)[:200]})")
def git(*args):
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=20).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None
commit = git("rev-parse", "HEAD") if os.path.exists(".git") else None
dirty = bool(git("status", "--porcelain", "--untracked-files=no")) if commit else None
digest = hashlib.sha256()
for root in ("kdlib", "tests", "benchmarks"):
    for dirpath, dirnames, files in sorted(os.walk(root)):
        dirnames.sort()
        for name in sorted(files):
            if name.endswith((".py", ".sh")):
                path = os.path.join(dirpath, name)
                digest.update(path.encode() + open(path, "rb").read())
env.update(commit=commit or os.environ.get("GPU_CHECK_COMMIT") or "unknown",
           dirty=dirty if dirty is not None else {"1": True, "0": False}.get(os.environ.get("GPU_CHECK_DIRTY", ""), None),
           commit_from="git" if commit else ("GPU_CHECK_COMMIT" if os.environ.get("GPU_CHECK_COMMIT") else "unknown"),
           sources_sha256=digest.hexdigest())
print(json.dumps(env))
sys.exit(3 if missing else 0)
PY
PRE=$?
PARTS="prerequisites"
echo $PRE >"$WORK/prerequisites.rc"; echo 0 >"$WORK/prerequisites.seconds"; cp "$WORK/env.log" "$WORK/prerequisites.log"
if [ "$PRE" -ne 0 ]; then
  echo failed >"$WORK/prerequisites.status"
  report
  echo "[gpu_check] missing prerequisites: $("$PY" -c 'import json,sys; print("; ".join(json.load(open(sys.argv[1]))["missing"]))' "$WORK/env.json" 2>/dev/null || cat "$WORK/env.log")" >&2
  echo "[gpu_check] wrote $DEST" >&2
  exit 3
fi
echo ok >"$WORK/prerequisites.status"
report

# -- the parts --------------------------------------------------------------------------------------------------
JUNIT="--junitxml=$WORK/tests.xml"
if [ "$MODE" = gpu ]; then
  part tests 170 60 "$PY" -m pytest -rA -p no:cacheprovider "$JUNIT" tests/test_gpu.py
  for prec in bf16:bf16 fp32:none; do
    part "bench_${prec%%:*}" 60 30 "$PY" -m kdlib bench --device cuda --cache-warmup fill --no-methods --json --amp "${prec##*:}"
  done
  for prec in bf16:auto fp32:none; do
    part "paper_${prec%%:*}" 100 60 "$PY" -m kdlib bench --device cuda --paper-run --teacher-cache off --json --amp "${prec##*:}"
  done
elif [ "$MODE" = smoke ]; then
  part tests 600 30 env KDLIB_GPU_TESTS_DEVICE=cpu "$PY" -m pytest -rA -p no:cacheprovider "$JUNIT" tests/test_gpu.py -k "step_by_step and engine"
  for prec in bf16:bf16 fp32:none; do
    part "bench_${prec%%:*}" 600 30 "$PY" -m kdlib bench --device cpu --quick --pair resnet8:resnet8 --steps 2 --repeats 1 \
      --warmup 1 --fill-images 1 --threads 1 --no-methods --json --amp "${prec##*:}"
  done
  for prec in bf16:auto fp32:none; do
    part "paper_${prec%%:*}" 600 30 "$PY" -m kdlib bench --device cpu --paper-run --quick --json --amp "${prec##*:}"
  done
else  # dry: stand-ins with the outputs' shapes; one test passes, one fails, one skips; one part overruns its limit
  mkdir -p "$WORK/dry"
  printf 'import pytest\ndef test_passes():\n    assert True\ndef test_fails():\n    assert 1 == 2\n@pytest.mark.skip(reason="dry")\ndef test_skips():\n    pass\n' >"$WORK/dry/test_dry.py"
  part tests 60 5 "$PY" -m pytest -rA -p no:cacheprovider "$JUNIT" "$WORK/dry/test_dry.py"
  fake='import json, sys; a = sys.argv[1]; print("progress line"); print(json.dumps({"amp": a, "reference_img_s": 100.0, "kdlib_img_s": 400.0, "kdlib_graphed_img_s": 50000.0 if a == "bf16" else 30000.0, "speedup_graphed": 500.0, "graphed_vs_eager": 125.0, "student_projected_minutes": 5.0, "teacher_projected_minutes": 20.0}))'
  part bench_bf16 20 1 "$PY" -c "$fake" bf16
  part bench_fp32 20 1 "$PY" -c "$fake" none
  part paper_bf16 2 1 "$PY" -c "import time; print('epoch 1', flush=True); time.sleep(30)"
  part paper_fp32 "$BUDGET" "$BUDGET" "$PY" -c "print('never runs')"
fi
report
"$PY" -c 'import json,sys; r=json.load(open(sys.argv[1])); print(json.dumps(r["summary"], indent=1)); print({k: v["status"] for k, v in r["parts"].items()})' "$DEST"
echo "[gpu_check] wrote $DEST in $(( $(date +%s) - START )) s" >&2
rm -rf "$WORK"
