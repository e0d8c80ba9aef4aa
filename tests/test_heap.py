"""filo.heap: batch work reuses freed pages; the service's setting hands them back.

The page-fault counts are the kernel's (``ru_minflt``): a 64 MB block that glibc maps afresh
faults once per 4 KiB page on first touch (16,384 faults); one served from pages already in the
heap faults (almost) never.
"""

from __future__ import annotations

import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from filo import heap
from filo.memory.build import images_per_batch
from filo.memory.config import MemoryConfig

pytestmark = pytest.mark.skipif(heap.glibc() is None, reason="needs glibc's mallopt")

ROOT = Path(__file__).resolve().parents[1]
BLOCK = 64 << 20  # above glibc's largest mmap threshold (32 MB): mapped afresh by default
PAGES = BLOCK // 4096


def faults_of_a_forward_step() -> int:
    """Page faults of one step shaped like a layer of a forward pass: two 64 MB inputs and
    their 64 MB sum, all freed at the end."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a, b = torch.ones(BLOCK // 4), torch.ones(BLOCK // 4)
    c = a + b
    del a, b, c
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def run_isolated(code: str) -> str:
    """In a fresh interpreter: mallopt's settings belong to the whole process."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_repeated_batch_steps_stop_faulting():
    out = run_isolated("""
        import tests.test_heap as t
        from filo import heap
        plain = [t.faults_of_a_forward_step() for _ in range(3)]
        with heap.keep_freed_pages() as applied:
            kept = [t.faults_of_a_forward_step() for _ in range(10)]
            with heap.keep_freed_pages():  # nested: the outer setting stays
                pass
            nested = t.faults_of_a_forward_step()
        print(applied, min(plain), max(kept[-3:]), nested)
    """)
    applied, plain, kept, nested = out.split()
    steps = 3 * PAGES  # pages one step touches
    assert applied == "True"
    # by default every step maps its blocks again: one fault per page
    assert int(plain) >= 0.9 * steps
    # inside: once the heap holds a step's blocks (a few steps: freed blocks must coalesce
    # before a new aligned block fits), steps reuse its pages; a nested block changes nothing
    assert int(kept) < 0.05 * steps and int(nested) < 0.05 * steps


def test_leaving_batch_work_returns_the_kept_pages():
    out = run_isolated("""
        import torch
        from filo import heap

        def rss_mb():
            for line in open("/proc/self/status"):
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024

        with heap.keep_freed_pages():
            blocks = [torch.ones(16 << 20) for _ in range(8)]  # 8 x 64 MB in the heap
            del blocks
            inside = rss_mb()
        print(inside, rss_mb())
    """)
    inside, after = (float(v) for v in out.split())
    assert inside - after > 300  # the freed 512 MB stayed while inside, and left on exit


def test_batches_follow_the_memory_budget():
    small = MemoryConfig(backbone="wrn50", imagesize=224)
    mid = MemoryConfig(backbone="wrn50", imagesize=512, resize=512)
    large = MemoryConfig(backbone="wrn50", imagesize=1024, resize=1024)
    # 600 bytes per input pixel: 224 px is 30 MB per image, 512 px 150 MB, 1024 px 600 MB
    for device in ("cpu", "cuda", None):
        assert images_per_batch(small, 8, device) == 8
        assert images_per_batch(large, 8, device) == 1
        assert images_per_batch(small, 3, device) == 3  # never more than --batch_size
    # the 1,024 MB budget holds 6 images of 512 px; a CPU's 256 MB holds one
    assert images_per_batch(mid, 8, "cuda") == 1024 * 2 ** 20 // (512 * 512 * 600) == 6
    assert images_per_batch(mid, 8, "cpu") == 1
