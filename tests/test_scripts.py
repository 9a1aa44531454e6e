"""demo.sh and test.sh, the one-command entry points: valid bash, and the CI runs its tests through test.sh."""

import re
import shutil
import subprocess

import pytest

from conftest import ROOT


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash on this machine")
@pytest.mark.parametrize("script", ["demo.sh", "test.sh", ".ci/run"])
def test_the_shell_scripts_parse(script):
    # one script per call: `bash -n a b` checks only a (b is its first argument)
    done = subprocess.run(["bash", "-n", script], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_ci_runs_the_tests_through_test_sh():
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^(bash |\./)test\.sh\b", ci, re.MULTILINE)
    assert "pytest" not in ci.split("test.sh")[-1]  # no second test run of its own after it
    assert "REQUIRE_REAL_DATA" in ci and "chromium" in ci


def test_demo_sh_runs_the_readme_commands():
    demo = (ROOT / "demo.sh").read_text()
    for command in ("python3 -m venv .venv", "-r requirements.txt", "prepare_data.py demo --out data/demo",
                    "train.py --data-root data/demo --recipe cpu --epochs 8",
                    "test.py --data-root data/demo --subset test", "report.html"):
        assert command in demo


def test_each_script_installs_its_requirements_even_into_an_existing_venv():
    # demo.sh then test.sh on a fresh clone: demo.sh's .venv has no pytest, so test.sh must install anyway
    for script, requirements in (("demo.sh", "-r requirements.txt"), ("test.sh", "-r requirements-test.txt")):
        lines = (ROOT / script).read_text().splitlines()
        install = next(i for i, line in enumerate(lines) if requirements in line)
        guard = next(i for i, line in enumerate(lines) if line.startswith("if [ ! -x .venv/bin/python ]"))
        fi = next(i for i, line in enumerate(lines) if i > guard and line.strip() == "fi")
        assert not guard < install < fi, f"{script} installs only when .venv is missing"
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.index("bash demo.sh") < ci.index("bash test.sh")
