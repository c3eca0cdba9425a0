"""bench/gpu_check.sh must fit a short GPU window and never stop at the first failure.

Its GPU_CHECK_PLAN=1 mode prints each step's name, time limit and command without running it.
"""
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = 9 * 60  # DEVELOPERS.md: build, GPU tests and kernel benchmarks in under 9 minutes


def _plan(tmp_path) -> list[tuple[str, int, str]]:
    env = dict(os.environ, GPU_CHECK_PLAN="1", OUT=str(tmp_path))
    out = subprocess.run(["bash", ROOT / "bench" / "gpu_check.sh"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    steps = []
    for line in out.stdout.splitlines():
        if line.startswith("plan "):
            _, name, limit, cmd = line.split(" ", 3)
            steps.append((name, int(limit), cmd))
    return steps


def test_every_step_is_limited_and_the_sum_fits_the_window(tmp_path):
    steps = _plan(tmp_path)
    names = [s[0] for s in steps]
    assert names[0] == "build" and "tests" in names
    assert {"bench_sparse_adamw_step", "bench_remap_state", "bench_sampled_weight_grad", "bench_principal_weights",
            "bench_memory", "bench_train"} <= set(names)
    assert sum(s[1] for s in steps) < BUDGET_S, steps


def test_tests_do_not_stop_at_the_first_failure_and_report_junit(tmp_path):
    (cmd,) = [s[2] for s in _plan(tmp_path) if s[0] == "tests"]
    assert " -x" not in cmd and "--exitfirst" not in cmd and "--maxfail" not in cmd
    assert "--junitxml" in cmd
    for test_file in cmd.split():
        if test_file.startswith("tests/"):
            assert (ROOT / test_file).exists(), f"gpu_check.sh runs a missing test file {test_file}"


def test_what_comes_back_fits_the_device_tools_eight_files(tmp_path):
    """Each step writes its files under $OUT by --out or --junitxml; summary.json and log.txt are the script's."""
    files = {"summary.json", "log.txt"}
    for _, _, cmd in _plan(tmp_path):
        for word in cmd.replace("=", " ").split():
            if word.startswith(str(tmp_path)):
                files.add(Path(word).relative_to(tmp_path).as_posix())
    assert "train.json" in files and "tests.xml" in files, files
    assert len(files) <= 8, sorted(files)
