"""benchmarks/device_check.sh parses, and every benchmark suite and test path it names exists (it runs only on a
GPU machine, so a renamed suite would otherwise show up only when a GPU is lent)."""

import os
import re
import subprocess

from eval.bench import available_suites

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "device_check.sh")


def test_script_parses_and_names_existing_suites_and_tests():
    assert subprocess.run(["bash", "-n", SCRIPT], capture_output=True).returncode == 0
    text = open(SCRIPT, encoding="utf-8").read()
    suites = re.findall(r"--suite (\w+)", text)
    assert suites and set(suites) <= set(available_suites()), suites
    for path in re.findall(r"-m gpu (\S+)", text):
        assert os.path.exists(os.path.join(REPO, path)), path
