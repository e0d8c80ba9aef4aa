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


def faults_of_touching_a_block() -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(BLOCK // 4)
    t.fill_(1.0)
    del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def run_isolated(code: str) -> str:
    """In a fresh interpreter: mallopt's settings belong to the whole process."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_batch_work_touches_a_big_block_once_and_defaults_come_back():
    out = run_isolated(f"""
        import tests.test_heap as t
        from filo import heap
        plain = [t.faults_of_touching_a_block() for _ in range(3)]
        with heap.keep_freed_pages() as applied:
            kept = [t.faults_of_touching_a_block() for _ in range(3)]
            with heap.keep_freed_pages():  # nested: the outer setting stays
                pass
            nested = t.faults_of_touching_a_block()
        after = [t.faults_of_touching_a_block() for _ in range(2)]
        print(applied, min(plain), kept[1], kept[2], nested, min(after))
    """)
    applied, plain, kept1, kept2, nested, after = out.split()
    assert applied == "True"
    # by default every touch maps the block again: one fault per page
    assert int(plain) >= 0.9 * PAGES
    # inside: the second and later touches reuse the first one's pages
    assert int(kept1) < 0.05 * PAGES and int(kept2) < 0.05 * PAGES
    assert int(nested) < 0.05 * PAGES
    # on exit glibc's defaults are back: mapped afresh again
    assert int(after) >= 0.9 * PAGES


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
