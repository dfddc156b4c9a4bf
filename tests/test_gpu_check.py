"""benchmarks/gpu_check.sh runs end to end in its dry mode on the CPU (tiny shapes): every
section prints, the chunked attention matches XLA's, the personalization completes."""

import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # ~1.5 min of CPU: two compilations of the tiny model's step and sampler
def test_gpu_check_dry_run_on_cpu():
  result = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu_check.sh"), "--dry"],
                          env={**os.environ, "PYTHON": sys.executable, "JAX_PLATFORMS": "cpu"},
                          capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  for header in ("1. attention kernels", "2. parity", "3. fast finetuning step",
                 "4. device memory", "5. personalization end to end", "gpu_check: done"):
    assert header in out, out
  assert re.search(r"xla +runs", out) and re.search(r"chunked +runs", out)
  assert "cudnn    not available" in out  # no GPU here: said, not hidden
  diffs = re.findall(r"chunked +256x256: max \|diff\| values (\S+), grads q/k/v (\S+) / (\S+) / (\S+)", out)
  assert diffs and all(float(d) < 5e-2 for d in diffs[0]), out
  assert re.search(r"second: [0-9.]+ s for hypernetwork \+ 2 steps", out)
