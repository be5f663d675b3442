"""The CLI keeps freed memory in the process (allocator.keep_freed_memory): large tensors freed and allocated again no
longer fault their pages in anew. Run in child processes, because the tuning is process-wide and cannot be undone."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import worker_env

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")

# the CLI's start-up (a real command), then 10 rounds of a 64 MiB tensor allocated, written and freed
SCRIPT = """
import json, resource, torch
from GMSSegmentLib import allocator, cli
rc = cli.main(["info", "busi-lesion"])
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.empty(16 << 20, dtype=torch.float32).fill_(1.0)
print(json.dumps({"rc": rc, "tuned": allocator._done,
                  "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0}))
"""


def _run(flag: str) -> dict:
    env = dict(worker_env(), GMS_MALLOC_TUNING=flag)
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_cli_keeps_freed_memory_and_can_be_switched_off():
    default, tuned = _run("0"), _run("1")
    assert default["rc"] == 0 and tuned["rc"] == 0
    assert default["tuned"] is False and tuned["tuned"] is True
    pages = (64 << 20) // 4096
    assert default["faults"] >= 8 * pages  # glibc's default: every round maps fresh pages
    assert tuned["faults"] <= 2 * pages  # tuned: the first round's pages are reused
