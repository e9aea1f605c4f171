"""equiforce.deploy.allocator.tune_malloc: applied by default, skipped when the user opts out or tunes
malloc through glibc's own environment variables (run in subprocesses: the setting is process-wide)."""
import os
import subprocess
import sys

import pytest

CODE = "from equiforce.deploy.allocator import tune_malloc; print(tune_malloc())"


@pytest.mark.parametrize("env,expected", [
    ({}, "True"),
    ({"EQUIFORCE_MALLOC_TUNING": "0"}, "False"),
    ({"MALLOC_MMAP_THRESHOLD_": "65536"}, "False"),
    ({"MALLOC_TRIM_THRESHOLD_": "65536"}, "False"),
])
def test_tune_malloc(env, expected):
    base = {k: v for k, v in os.environ.items()
            if k not in ("EQUIFORCE_MALLOC_TUNING", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}
    out = subprocess.run([sys.executable, "-c", CODE], env=dict(base, **env), capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == expected
