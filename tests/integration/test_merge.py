#!/usr/bin/env python3
"""Merging as seen from outside: shared frames in pagemap, the kernel's
counters and formulas, /proc/meminfo, copy-on-write, zero pages, runs,
and every way of unmerging."""
import os
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sptest import (PAGE, Env, Skip, all_merged, check,  # noqa: E402
                    converge, map_count, meminfo, pfns, pool_vmas, run_tests,
                    sanitizer_build, shared, twins, wait_for)


def test_two_processes_share(env=None):
    """4000 duplicate, 1000 zero and 1000 unique pages per process."""
    with Env() as e:
        a, b = e.proc(env=env), e.proc(env=env)
        for p, own in ((a, 2), (b, 3)):
            p.map(6000)
            p.ok("fill 1 0 4000")
            p.ok("fill 0 4000 1000")
            p.ok(f"fill {own} 5000 1000")
            p.ok("merge")
        st = converge(e.d, "pages_sharing", 4000)
        st = converge(e.d, "ksm_zero_pages", 2000)
        check(shared(a, b, 0, 4000) == 4000,
              f"only {shared(a, b, 0, 4000)} of 4000 frames shared")
        zero = set(a.pfns(4000, 1000) + b.pfns(4000, 1000))
        check(len(zero) == 1, f"zero pages on {len(zero)} frames, want 1")
        check(shared(a, b, 5000, 1000) == 0, "unique pages shared")
        own = set(a.pfns(5000, 1000)) | set(b.pfns(5000, 1000))
        check(len(own) == 2000, "unique pages not on their own frames")
        # The kernel's formulas (Documentation/admin-guide/mm/ksm.rst).
        check(st["pages_shared"] == 4000, f"pages_shared {st['pages_shared']}")
        check(st["pages_sharing"] == 4000, f"pages_sharing {st['pages_sharing']}")
        check(st["ksm_zero_pages"] == 2000, "ksm_zero_pages")
        check(st["pages_unshared"] == 2000,
              f"pages_unshared {st['pages_unshared']}, want 2000")
        check(st["general_profit"] ==
              (st["pages_sharing"] + st["ksm_zero_pages"]) * PAGE -
              st["metadata_bytes"], "general_profit formula")
        for p in st["processes"]:
            check(p["ksm_merging_pages"] == 4000, "per-process merging")
            check(p["ksm_zero_pages"] == 1000, "per-process zero pages")
        for p, own in ((a, 2), (b, 3)):
            p.ok("check 1 0 4000")
            p.ok("check 0 4000 1000")
            p.ok(f"check {own} 5000 1000")


def test_meminfo_drops():
    """System-wide: anonymous memory falls by what the counters claim."""
    n = 25000  # ~100 MiB per process
    if sanitizer_build():
        raise Skip(f"{sanitizer_build()} build: its shadow memory is "
                   "anonymous memory too")
    with Env() as e:
        a, b = e.proc(), e.proc()
        for p in (a, b):
            p.map(n)
            p.ok(f"fill 1 0 {n}")
        before = meminfo()
        for p in (a, b):
            p.ok("merge")
        st = converge(e.d, "pages_sharing", n)
        after = meminfo()
        anon_kb = before["AnonPages"] - after["AnonPages"]
        shmem_kb = after["Shmem"] - before["Shmem"]
        # 2n private pages became n pool pages (shmem).
        want_anon, want_shmem = 2 * n * 4, n * 4
        check(anon_kb > 0.9 * want_anon,
              f"AnonPages fell {anon_kb} kB, want ~{want_anon}")
        check(abs(shmem_kb - want_shmem) < 0.1 * want_shmem,
              f"Shmem rose {shmem_kb} kB, want ~{want_shmem}")
        # Not MemFree: on this VM, free page reporting holds freed pages
        # back for seconds (measured: MemFree trails by ~100 MB for 3 s).
        net = (before["AnonPages"] + before["Shmem"]) - \
            (after["AnonPages"] + after["Shmem"])
        check(net > 0.9 * n * 4, f"anon + shmem fell {net} kB, want ~{n * 4}")
        check(st["pages_shared"] == n, "pages_shared")
        for p in (a, b):
            p.ok(f"check 1 0 {n}")


def test_copy_on_write():
    with Env() as e:
        a, b = twins(e, 2000)
        converge(e.d, "pages_sharing", 2000)
        check(shared(a, b) == 2000, "not merged")
        for pg in (0, 7, 511, 512, 1999):
            a.ok(f"write {pg} 171")
        b.ok("check 1 0 2000")
        written = (0, 7, 511, 512, 1999)
        for pg in range(2000):
            r = a.cmd(f"check 1 {pg} 1")
            check((r != "ok") == (pg in written),
                  f"A page {pg}: {r}, written {pg in written}")
        pa, pb = a.pfns(), b.pfns()
        for pg in written:
            check(pa[pg] != pb[pg], f"page {pg} still shared after write")
        check(shared(a, b) == 1995, f"{shared(a, b)} shared, want 1995")
        # B writes too: both private, each sees its own byte.
        b.ok("write 7 99")
        check(b.cmd("check 1 7 1") != "ok", "B's write lost")
        b.ok("check 1 8 1992")
        a.ok("check 1 8 503")


def test_zero_pages_kernel_semantics():
    """use_zero_pages=1: zero pages map the zero page, are counted in
    ksm_zero_pages and never reach the pool; use_zero_pages=0: they
    merge like any other content."""
    with Env(use_zero_pages=1) as e:
        a, b = twins(e, 3000, seed=0)
        st = converge(e.d, "ksm_zero_pages", 6000)
        check(st["pool_pages"] == 0, f"pool holds {st['pool_pages']} pages")
        check(st["pages_sharing"] == 0, "zero pages counted as sharing")
        check(len(set(a.pfns() + b.pfns())) == 1, "not on one zero frame")
        for p in (a, b):
            p.ok("check 0 0 3000")
        a.ok("write 5 1")
        check(a.cmd("check 0 0 3000") == "err bad 5", "write to zero page")
        b.ok("check 0 0 3000")
        # the kernel decrements ksm_zero_pages when one is written
        check(wait_for(lambda: e.d.status()["ksm_zero_pages"] <= 5999, 10),
              "ksm_zero_pages did not fall after a write")
        e.d.set(run=2)  # unmerged: each gets a zeroed page of its own
        frames = a.pfns() + b.pfns()
        check(None not in frames and len(set(frames)) == 6000,
              f"{len(set(frames))} frames for 6000 pages after run=2")
        b.ok("check 0 0 3000")
    with Env(use_zero_pages=0) as e:
        # 2,000 pages of one content: a block of copies of the page
        # (test_one_content_maps_by_blocks), 2 to 16 of them at this
        # many references, rather than 2,000 mappings of one pool page
        a, b = twins(e, 1000, seed=0)
        st = all_merged(e.d, 2000)
        check(st["ksm_zero_pages"] == 0, "counted as zero pages")
        check(st["pages_shared"] <= 31, f"pages_shared {st['pages_shared']}")
        frames = set(a.pfns() + b.pfns())
        check(len(frames) == st["pages_shared"],
              f"{len(frames)} frames for {st['pages_shared']} pool pages")
        a.ok("check 0 0 1000")


def test_compare_in_place():
    """The agent compares pages through kernel copies (process_vm_readv);
    where that is refused (seccomp) it compares in place.  Same result."""
    test_two_processes_share(env={"SAMEPAGE_FAULT": "inplace"})


def test_check_without_pfns():
    """Without CAP_SYS_ADMIN pagemap shows no frame numbers, and the
    agent checks each new mapping byte for byte against the pool
    instead (SAMEPAGE_FAULT=nopfn, as if).  Same result."""
    test_two_processes_share(env={"SAMEPAGE_FAULT": "nopfn"})


def test_runs_map_as_one():
    """Consecutive duplicates merge as one mapping per run; their
    canonical pages are contiguous in the pool."""
    with Env() as e:
        a, b = twins(e, 4096)
        converge(e.d, "pages_sharing", 4096)
        # items carry at most 512 pages, so 8 runs at best
        va, vb = pool_vmas(a.pid), pool_vmas(b.pid)
        check(va <= 16 and vb <= 16,
              f"{va}/{vb} pool mappings for 4096 pages, want <= 16")
        # each pool VMA maps consecutive pool offsets: the VMAs cover all
        # 4096 pages, so the canonical pages of each run are contiguous
        lo, hi = a.addr, a.addr + 4096 * PAGE
        pages = 0
        with open(f"/proc/{a.pid}/maps") as f:
            for r in f:
                s, t = (int(x, 16) for x in r.split()[0].split("-"))
                if "samepage-pool" in r and lo <= s < hi:
                    pages += (t - s) // PAGE
        check(pages == 4096, f"pool VMAs cover {pages} pages, want 4096")
        # status shows the kernel's count, not the agent's arithmetic,
        # which counts two for each of the many items mapped: read
        # again a second after the last merge
        def shown():
            procs = {c["pid"]: c for c in e.d.status()["processes"]}
            return [procs[p.pid]["mappings"] for p in (a, b)]
        want = [map_count(p.pid) for p in (a, b)]
        wait_for(lambda: shown() == want, 5)
        check(shown() == want, f"status: {shown()} mappings, kernel {want}")


def test_one_content_maps_by_blocks():
    """Two programs whose 16,384 pages all hold one content (a pattern
    they filled memory with).  Every page merges, and each program maps
    the pool with a few hundred mappings, not one a page: a run of one
    content maps a block of copies of its page, one mapping per block
    (at most 64 pages).  The copies are the pool pages counted in
    pages_shared, 127 at most (blocks of 2 to 64).  Written pages stay
    their program's own, and once the programs are gone the pool is
    empty again."""
    n = 16384
    with Env() as e:
        a, b = e.proc(), e.proc()
        for p in (a, b):
            p.map(n)
            p.ok(f"fillone 5 0 {n}")
            p.ok("merge")
        st = all_merged(e.d, 2 * n)
        check(st["pages_shared"] <= 127,
              f"pages_shared {st['pages_shared']}, want <= 127")
        frames = set(a.pfns() + b.pfns())
        check(None not in frames and len(frames) == st["pages_shared"],
              f"{len(frames)} frames for {st['pages_shared']} pool pages")
        # one mapping a page would be 16,384 each (the budget allows
        # 57,000); by stages of 64 references a block size, then 64
        # pages a mapping: about 450 each
        for p in (a, b):
            v = pool_vmas(p.pid)
            check(v <= n // 16, f"{v} pool mappings for {n} pages, "
                  f"want <= {n // 16}")
            p.ok(f"checkone 5 0 {n}")
        for pg in (0, 63, 64, 1000, n - 1):
            a.ok(f"write {pg} 171")
        for pg in (0, 63, 64, 1000, n - 1):
            check(a.cmd(f"checkone 5 {pg} 1") == f"err bad {pg}",
                  f"A's write to page {pg} not seen")
        for lo, hi in ((1, 63), (65, 1000), (1001, n - 1)):
            a.ok(f"checkone 5 {lo} {hi - lo}")
        b.ok(f"checkone 5 0 {n}")
        a.quit()
        b.quit()
        check(wait_for(lambda: e.d.status()["pool_pages"] == 0, 30),
              f"{e.d.status()['pool_pages']} pool pages left without "
              "programs")


def test_late_program_merges_when_first_seen():
    """A program that starts once others have merged (a VM from the
    same image) has its pages merged when the scanner first reads them,
    as KSM merges a page equal to one in its stable tree: 4,000 pages
    merge for about 4,000 scanned, where waiting for the hash to hold
    still read each twice (8,000)."""
    n = 4000
    with Env() as e:
        a, b = twins(e, n)
        all_merged(e.d, 2 * n)
        c = e.proc()
        c.map(n)
        c.ok(f"fill 1 0 {n}")
        s0 = e.d.status()["pages_scanned"]
        c.ok("merge")
        st = all_merged(e.d, 3 * n)
        read = st["pages_scanned"] - s0
        check(shared(a, c) == n, f"{shared(a, c)} of {n} frames shared")
        check(read < 1.5 * n, f"{read} pages scanned to merge {n}, "
              f"want about {n}")
        c.ok(f"check 1 0 {n}")


def uffd_vmas(pid, lo, hi):
    """VMAs in [lo, hi) registered with a userfaultfd (smaps: um, uw)."""
    found, cur = [], None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and not head[0].endswith(":"):
                s, t = (int(x, 16) for x in head[0].split("-"))
                cur = (s, t) if s < hi and t > lo else None
            elif head[0] == "VmFlags:" and cur and \
                    ("um" in head[1:] or "uw" in head[1:]):
                found.append(cur)
    return found


def test_single_pages_leave_nothing_registered():
    """Every other page a duplicate: each merges alone, as one item.
    Nothing of the program stays registered with the agent's
    userfaultfd (a page touched there would wait for ever), and every
    page, merged or not, is written, dropped and faulted in again."""
    n = 600
    with Env() as e:
        a, b = e.proc(), e.proc()
        for p, own in ((a, 2), (b, 3)):
            p.map(n)
            for i in range(0, n, 2):
                p.ok(f"fill 1 {i} 1")
                p.ok(f"fill {own} {i + 1} 1")
            p.ok("merge")
        converge(e.d, "pages_sharing", n // 2)
        check(shared(a, b) == n // 2,
              f"{shared(a, b)} of {n // 2} frames shared")
        for p, own in ((a, 2), (b, 3)):
            check(pool_vmas(p.pid) >= n // 2,
                  f"{pool_vmas(p.pid)} pool mappings, want one a page")
            left = uffd_vmas(p.pid, p.addr, p.addr + n * PAGE)
            check(not left, f"{len(left)} VMAs registered after merging, "
                  f"first {left[0][0]:#x}" if left else "")
            for i in range(0, n, 2):
                p.ok(f"check 1 {i} 1")
                p.ok(f"check {own} {i + 1} 1")
        # written (copy-on-write), dropped and read as zeros, refilled
        a.ok(f"fill 7 0 {n}")
        a.ok(f"check 7 0 {n}")
        a.ok(f"dontneed 0 {n}")
        a.ok(f"check 0 0 {n}")
        a.ok(f"fill 8 0 {n}")
        a.ok(f"check 8 0 {n}")
        for i in range(0, n, 2):
            b.ok(f"check 1 {i} 1")
    # and where every compare fails, so that every page is put back
    with Env() as e:
        a, b = e.proc(env={"SAMEPAGE_FAULT": "differ"}), e.proc()
        for p in (a, b):
            p.map(n)
            for i in range(0, n, 2):
                p.ok(f"fill 1 {i} 1")
            p.ok("merge")
        converge(e.d, "full_scans", 4)
        # planned again and again: stop, and let the batches sent end
        # (within 25 ms in 8 runs; between two items nothing is
        # registered, so a look alone could come too early)
        e.d.set(run=0)
        time.sleep(1)
        left = uffd_vmas(a.pid, a.addr, a.addr + n * PAGE)
        check(not left, f"{len(left)} VMAs registered after pages were put "
              f"back, first {left[0][0]:#x}" if left else "")
        a.ok(f"dontneed 0 {n}")
        a.ok(f"check 0 0 {n}")


def test_unmerge_run2():
    with Env() as e:
        a, b = twins(e, 3000)
        converge(e.d, "pages_sharing", 3000)
        e.d.set(run=2)
        st = e.d.status()
        check(st["run"] == 0, f"run is {st['run']} after run=2, want 0")
        check(st["pages_sharing"] == 0 and st["pages_shared"] == 0,
              "counters not cleared")
        check(shared(a, b) == 0, f"{shared(a, b)} frames still shared")
        for p in (a, b):
            p.ok("check 1 0 3000")
            excl = sum(1 for m in p.pagemap() if m[0] and m[2] and not m[1])
            check(excl == 3000, f"{excl} of 3000 pages private anonymous")
            # in anonymous mappings again, not the pool's: they can merge
            check(pool_vmas(p.pid) == 0,
                  f"{pool_vmas(p.pid)} pool mappings left after run=2")
        # nothing merges while run=0
        c, d = twins(e, 1000, seed=5)
        time.sleep(1)
        check(shared(c, d) == 0, "merged while run=0")
        e.d.set(run=1)
        converge(e.d, "pages_sharing", 4000)
        check(shared(c, d) == 1000, "not merged after run=1")
        check(shared(a, b) == 3000,
              f"{shared(a, b)} of 3000 unmerged pages merged again")
        for p in (a, b, c, d):
            p.ok(f"check {5 if p in (c, d) else 1} 0 {p.npages}")


def test_unmerge_madvise():
    with Env() as e:
        a, b = twins(e, 3000)
        converge(e.d, "pages_sharing", 3000)
        a.ok("unmerge")
        check(shared(a, b) == 0, f"{shared(a, b)} frames shared after "
              "MADV_UNMERGEABLE")
        a.ok("check 1 0 3000")
        b.ok("check 1 0 3000")
        st = wait_for(lambda: (lambda s: s if s["pages_sharing"] == 0
                               else None)(e.d.status()), 10)
        check(st, "pages_sharing not 0 after unmerge")
        time.sleep(0.5)
        check(shared(a, b) == 0, "merged again after MADV_UNMERGEABLE")
        # as under KSM, opting in again merges them again
        a.ok("merge")
        converge(e.d, "pages_sharing", 3000)
        check(shared(a, b) == 3000, f"{shared(a, b)} of 3000 shared after "
              "MADV_MERGEABLE again")
        a.ok("check 1 0 3000")
        b.ok("check 1 0 3000")


def test_prctl_merge_any():
    """PR_SET_MEMORY_MERGE 1 opts in everything, including later maps;
    0 unmerges it all.  The kernel's KSM is not asked."""
    with Env() as e:
        ps = [e.proc(), e.proc()]
        for p in ps:
            p.ok("prctl 1")
            check(p.ok("getprctl") == "1", "PR_GET_MEMORY_MERGE != 1")
            p.map(2000)
            p.ok("fill 1 0 2000")
        converge(e.d, "pages_sharing", 2000)
        a, b = ps
        check(shared(a, b) == 2000, "prctl'd mappings not merged")
        with open(f"/proc/{a.pid}/ksm_stat") as f:
            ks = f.read()
        check("ksm_merge_any: no" in ks or "ksm_merge_any" not in ks,
              "kernel KSM was switched on: " + ks)
        a.ok("prctl 0")
        check(a.ok("getprctl") == "0", "PR_GET_MEMORY_MERGE != 0")
        check(shared(a, b) == 0, "shared after prctl 0")
        a.ok("check 1 0 2000")
        b.ok("check 1 0 2000")


def test_prctl_survives_exec():
    """As with the kernel, PR_SET_MEMORY_MERGE holds across execve, and
    its 0 does too."""
    with Env() as e:
        a, b = e.proc(), e.proc()
        a.ok("prctl 1")
        a.ok("exec")
        check(a.ok("getprctl") == "1", "PR_GET_MEMORY_MERGE != 1 after exec")
        b.ok("prctl 1")
        for p in (a, b):
            p.map(2000)
            p.ok("fill 1 0 2000")
        converge(e.d, "pages_sharing", 2000)
        check(shared(a, b) == 2000, "exec'd program's mappings not merged")
        a.ok("prctl 0")
        a.ok("exec")
        check(a.ok("getprctl") == "0", "PR_GET_MEMORY_MERGE != 0 after exec")


def test_prctl_holds_in_forked_children():
    """As with the kernel, which copies MMF_VM_MERGE_ANY on fork, a child
    forked after PR_SET_MEMORY_MERGE has it set, and the memory it maps
    later merges with another program's."""
    if sanitizer_build() == "asan":
        # gdb, 2 of 80 runs: the agent thread the child starts blocks for
        # ever in GCC 12's libasan, in its own thread start (a free into
        # its quarantine waits on an allocator mutex the fork copied
        # taken).  That runtime does not make its allocator safe across
        # fork; glibc's malloc is.
        raise Skip("asan build: GCC 12's libasan allocator is not safe "
                   "across fork in a threaded program (the child's agent "
                   "thread hangs in ASan's thread start, 2 runs of 80)")
    with Env() as e:
        a, b = e.proc(), e.proc()
        a.ok("prctl 1")
        pid, addr, get = a.ok("forkmap 2000").split()
        check(get == "1", f"PR_GET_MEMORY_MERGE in the child: {get}")
        b.map(2000)
        b.ok("fill 1 0 2000")
        b.ok("merge")
        converge(e.d, "pages_sharing", 2000)
        child = pfns(int(pid), int(addr, 16), 2000)
        n = sum(1 for x, y in zip(child, b.pfns())
                if x is not None and x == y)
        check(n == 2000, f"{n} of the child's 2000 pages shared")
        check(a.ok("wait") == "0", "the child saw wrong contents")
        b.ok("check 1 0 2000")


def test_pages_shared_after_fork_merge():
    """Pages a parent and its child still share after fork merge too, as
    KSM merges them: each agent first gives its process a copy of its
    own (what a write would do), and merges that.  All three processes
    end on the same frames, and each keeps its bytes."""
    n = 2000
    with Env() as e:
        e.d.set(run=0)
        a, b = twins(e, n)
        pid, addr, _ = a.ok("forkmap 0").split()
        pid, addr = int(pid), int(addr, 16)
        child = pfns(pid, addr, n)
        check(sum(1 for x, y in zip(child, a.pfns()) if x and x == y) == n,
              "the child does not share its parent's frames after fork")
        e.d.set(run=1)
        # the child and a each merge in their own time (a slower under
        # TSan): wait for both
        wait_for(lambda: shared(a, b) == n and (
            lambda c: all(x is not None and x == y for x, y
                          in zip(c, b.pfns())))(pfns(pid, addr, n)), 30)
        child = pfns(pid, addr, n)
        both = sum(1 for x, y in zip(child, b.pfns()) if x and x == y)
        check(both == n, f"{both} of the child's {n} pages on b's frames")
        check(shared(a, b) == n, f"{shared(a, b)} of a's {n} pages shared")
        st = e.d.status()
        check(st["pages_shared"] == n and st["pages_sharing"] == 2 * n,
              f"pages_shared {st['pages_shared']}, pages_sharing "
              f"{st['pages_sharing']}: want {n}, {2 * n}")
        check(st["pinned_skipped"] == 0,
              f"pinned_skipped {st['pinned_skipped']}: none is pinned")
        a.ok("write 3 1")
        a.ok(f"check 1 4 {n - 4}")
        b.ok(f"check 1 0 {n}")
        check(a.ok("wait") == "0", "the child saw wrong contents")
        check(not a.err().strip(), f"the agent wrote to the program's "
              f"stderr: {a.err()[:200]}")


def test_zero_pages_shared_after_fork_merge():
    """Pages of zeros written before fork (real frames, on this kernel
    also pages only read: pvm_no_zero_page) and shared with the child
    since: as KSM does, with use_zero_pages both processes end on the
    zero page, and without it on the pool: on one pool page for KSM, on a
    block of copies of it here (test_one_content_maps_by_blocks), 31
    pages at most for 2,000 references."""
    n = 1000
    for zero in (1, 0):
        with Env() as e:
            e.d.set(run=0, use_zero_pages=zero)
            a = e.proc()
            a.map(n)
            a.ok(f"fill 0 0 {n}")
            a.ok("merge")
            pid, addr, _ = a.ok("forkmap 0 0").split()
            pid, addr = int(pid), int(addr, 16)
            check(pfns(pid, addr, n) == a.pfns(),
                  "the child does not share its parent's frames")
            e.d.set(run=1)
            if zero:
                st = converge(e.d, "ksm_zero_pages", 2 * n)
            else:
                st = all_merged(e.d, 2 * n)
                check(st["pages_shared"] <= 31,
                      f"pages_shared {st['pages_shared']}, want <= 31")
            frames = set(a.pfns()) | set(pfns(pid, addr, n))
            want = 1 if zero else st["pages_shared"]
            check(len(frames) == want, f"{len(frames)} frames for {2 * n} "
                  f"pages of zeros, want {want}")
            a.ok(f"fill 5 0 {n // 2}")
            a.ok(f"check 5 0 {n // 2}")
            a.ok(f"check 0 {n // 2} {n - n // 2}")
            check(a.ok("wait") == "0", "the child saw wrong contents")


def test_scanning_copies_nothing_after_fork():
    """Reading a page to hash it must not give the process a copy of a
    page it shares with its child since fork (process_vm_readv would:
    a pin makes a shared page the pinner's own).  Unique pages stay
    shared by parent and child through several passes, and `samepage
    estimate` leaves them so too."""
    n = 2000
    with Env() as e:
        a = e.proc()
        a.map(n)
        a.ok(f"fill 1 0 {n}")  # the child checks for seed 1
        a.ok("merge")
        # No read in flight at fork time: fork copies a page that is
        # pinned at that instant, and process_vm_readv pins for its read.
        e.d.set(run=0)
        pid, addr, _ = a.ok("forkmap 0").split()
        pid, addr = int(pid), int(addr, 16)
        frames = a.pfns()
        check(pfns(pid, addr, n) == frames, "not shared after fork")
        e.d.set(run=1)
        scans = e.d.status()["full_scans"]
        check(wait_for(lambda: e.d.status()["full_scans"] >= scans + 3, 20),
              "three passes did not end")
        e.d.cli("estimate", str(a.pid), str(pid))
        # neither copied nor merged onto pool pages: on the same frames
        moved = sum(1 for x, y in zip(a.pfns(), frames) if x != y)
        check(moved == 0, f"{moved} of {n} pages left their frames")
        moved = sum(1 for x, y in zip(pfns(pid, addr, n), frames) if x != y)
        check(moved == 0, f"{moved} of the child's {n} pages left them")
        check(a.ok("wait") == "0", "the child saw wrong contents")


def anon_huge_kb(pid, addr):
    """AnonHugePages of the mapping at addr, from smaps."""
    inside = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "AnonHugePages:":
                return int(line.split()[1])
    return 0


def test_huge_pages_merge():
    """Memory the kernel backs with transparent huge pages
    (MADV_HUGEPAGE) merges page by page, as KSM splits and merges it;
    copy-on-write and contents as for small pages."""
    n = 2048  # 8 MiB: four huge pages
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
        if "[never]" in f.read():
            raise Skip("transparent huge pages are off (enabled: never)")
    with Env() as e:
        ps = [e.proc(), e.proc()]
        for p in ps:
            p.addr, p.npages = int(p.ok(f"maphuge {n}"), 16), n
            p.ok(f"fill 1 0 {n}")
        huge = anon_huge_kb(ps[0].pid, ps[0].addr)
        if huge == 0:
            raise Skip("the kernel gave no huge page to an aligned "
                       "MADV_HUGEPAGE range (none free?)")
        for p in ps:
            p.ok("merge")
        a, b = ps
        shared_then_cow(e, a, b, n)
        check(shared(a, b) == n - 1, f"{shared(a, b)} of {n - 1} still "
              "shared after one write")
        check(anon_huge_kb(a.pid, a.addr) < huge,
              f"still {anon_huge_kb(a.pid, a.addr)} kB of huge pages")


def test_runs_across_vma_boundaries():
    """A run of duplicates that spans two anonymous VMAs (split here by
    MADV_DONTDUMP) merges whole: no page is written off as immovable."""
    with Env() as e:
        ps = [e.proc(), e.proc()]
        for p in ps:
            p.map(2000)
            p.ok("fill 1 0 2000")
            for first in (300, 1000, 1700):
                p.ok(f"dontdump {first} 100")
            p.ok("merge")
        converge(e.d, "pages_sharing", 2000)
        check(shared(*ps) == 2000, f"{shared(*ps)} of 2000 shared")
        for p in ps:
            p.ok("check 1 0 2000")


def mapmalloc(p, n):
    """p's region becomes n pages from posix_memalign."""
    p.addr, p.npages = int(p.ok(f"mapmalloc {n}"), 16), n


def shared_then_cow(e, a, b, n):
    """a and b come to share their n equal pages; then a write to one of
    a's is a's alone."""
    converge(e.d, "pages_sharing", n)
    check(shared(a, b) == n, f"{shared(a, b)} of {n} shared")
    a.ok("write 3 1")
    b.ok(f"check 1 0 {n}")
    a.ok(f"check 1 4 {n - 4}")


def test_malloc_memory_merges():
    """Memory from posix_memalign (glibc maps it itself, unseen by the
    interposer) merges once madvise'd, as with the kernel."""
    with Env() as e:
        a, b = e.proc(), e.proc()
        for p in (a, b):
            mapmalloc(p, 2000)
            p.ok("fill 1 0 2000")
            p.ok("merge")
        shared_then_cow(e, a, b, 2000)


def test_prctl_takes_malloc_memory():
    """After PR_SET_MEMORY_MERGE 1, memory malloc maps itself (unseen by
    the interposed mmap) is taken too, as KSM takes every new mapping.
    Freed and allocated again, it is taken again."""
    if sanitizer_build():
        raise Skip("a sanitizer's shadow and allocator memory is private "
                   "anonymous and touched on every access: the agent does "
                   "not sweep for malloc's mappings under a sanitizer")
    with Env() as e:
        a, b = e.proc(), e.proc()
        for p in (a, b):
            p.ok("prctl 1")
            mapmalloc(p, 2000)
            p.ok("fill 1 0 2000")
        shared_then_cow(e, a, b, 2000)
        a.ok("freemalloc")
        mapmalloc(a, 3000)
        a.ok("fill 1 0 3000")
        converge(e.d, "pages_sharing", 2000)    # onto b's pool pages
        check(shared(a, b, 0, 2000) == 2000,
              f"{shared(a, b, 0, 2000)} of 2000 shared after malloc again")
        a.ok("prctl 0")
        check(shared(a, b, 0, 2000) == 0, "shared after prctl 0")
        a.ok("check 1 0 3000")
        b.ok("check 1 0 2000")


def test_refuses_what_ksm_refuses():
    """MAP_SHARED memory is not merged, as KSM ignores it; madvise
    succeeds, as with the kernel."""
    with Env() as e:
        a, b = e.proc(), e.proc()
        for p in (a, b):
            p.map(1000, shared=True)
            p.ok("fill 1 0 1000")
            p.ok("merge")
        time.sleep(1.5)
        st = e.d.status()
        check(st["pages_sharing"] == 0, "shared memory merged")
        for p in st["processes"]:
            check(p["registered_pages"] == 0,
                  f"{p['registered_pages']} shared pages registered")
        check(shared(a, b) == 0, "MAP_SHARED pages on one frame")
        a.ok("check 1 0 1000")


def region_maps(p, n):
    """The lines of /proc/PID/maps over p's region: "START-END PERMS"."""
    lo, hi = p.addr, p.addr + n * PAGE
    out = []
    with open(f"/proc/{p.pid}/maps") as f:
        for line in f:
            s, t = (int(x, 16) for x in line.split()[0].split("-"))
            if s < hi and t > lo:
                out.append(" ".join(line.split()[:2]))
    return out


def region_perms(p, n):
    """The permission strings of the mappings over p's region."""
    return {line.split()[1] for line in region_maps(p, n)}


def test_protection_kept():
    """A range made read-only after it opted in is merged as KSM would,
    and stays read-only: a write to it still faults, before and after
    merging, and the program's bytes are intact."""
    with Env() as e:
        a, b = twins(e, 2000)
        for p in (a, b):
            p.ok("mprotect 0 1000 1")       # PROT_READ
        converge(e.d, "pages_sharing", 2000)
        check(shared(a, b, 0, 1000) == 1000, "read-only half not shared")
        check(shared(a, b, 1000, 1000) == 1000, "read-write half not shared")
        for p in (a, b):
            ro = region_perms(p, 1000)
            check(ro == {"r--p"}, f"read-only half mapped {ro}")
            tries, wrote = map(int, p.ok("rowrite 2 1 0 1000").split())
            check(tries > 0 and wrote == 0,
                  f"{wrote} of {tries} writes to read-only pages went in")
            p.ok("check 1 0 2000")
        # and the read-write half still takes writes, each its own
        a.ok("write 1500 9")
        b.ok("check 1 1500 1")
        # unmerged (copy-on-write broken through /proc/self/mem, as the
        # range cannot be written), it stays read-only and intact
        a.ok("unmerge")
        check(shared(a, b, 0, 1000) == 0, "read-only half shared after "
              "MADV_UNMERGEABLE")
        check(region_perms(a, 1000) == {"r--p"},
              f"read-only half mapped {region_perms(a, 1000)} after unmerge")
        a.ok("check 1 0 1000")
        check(a.ok("rowrite 1 1 0 1000").split()[1] == "0",
              "a write to the unmerged read-only half went in")


def readonly_pair(e, n, fault):
    """Two programs with n equal read-only pages, opted in; the first
    with SAMEPAGE_FAULT=fault."""
    ps = [e.proc(env={"SAMEPAGE_FAULT": fault}), e.proc()]
    for p in ps:
        p.map(n)
        p.ok(f"fill 1 0 {n}")
        p.ok(f"mprotect 0 {n} 1")
        p.ok("merge")
    return ps


def test_readonly_writes_fault_during_merge():
    """Read-only pages are writable for the kernel while they are merged
    (UFFDIO_MOVE moves only between writable mappings).  Threads try to
    write them all through merging, each merge held open 200 ms: every
    try must fault, as without samepage, and no byte may change."""
    n = 1500
    with Env() as e:
        a, b = readonly_pair(e, n, "delay")
        tries, wrote = map(int, a.ok(f"rowrite 2 6 0 {n}").split())
        check(tries > 1000, f"only {tries} tries")
        check(wrote == 0, f"{wrote} of {tries} writes to read-only pages "
              "went in while they were merged")
        converge(e.d, "pages_sharing", n)
        check(shared(a, b) == n, "read-only pages not shared")
        check(region_perms(a, n) == {"r--p"},
              f"mapped {region_perms(a, n)} after merging")
        a.ok(f"check 1 0 {n}")
        b.ok(f"check 1 0 {n}")


def test_readonly_pages_put_back_stay_readonly():
    """Read-only pages that are moved out and found changed (injected)
    go back into a range that is read-only again first.  Each item is held
    open 200 ms once its pages are back (or would be); threads try to
    write them at random moments (a thread that tries early waits until
    the wake, so they pause between tries): every try must fault, and no
    byte may change."""
    n = 600
    with Env() as e:
        a, b = readonly_pair(e, n, "differ,latedelay")
        tries, wrote = map(int, a.ok(f"rowrite 4 5 0 {n} 40000").split())
        changed = int(a.stats()["changed"])
        check(changed >= n, f"only {changed} pages went out and back")
        check(tries > 50, f"only {tries} tries")
        check(wrote == 0, f"{wrote} of {tries} writes to read-only pages "
              "went in after they were put back")
        check(shared(a, b) == 0, "pages found changed were shared")
        # items are planned again and again (they always "differ"): stop
        # and let the last one end, in which the range is writable
        e.d.set(run=0)
        t0, before = time.time(), int(a.stats()["changed"])
        # batches already sent are still worked through, 200 ms each
        wait_for(lambda: region_perms(a, n) == {"r--p"}, 10)
        perms = region_perms(a, n)
        check(perms == {"r--p"},
              f"mapped {perms} {time.time() - t0:.1f} s after run=0; "
              f"{int(a.stats()['changed']) - before} pages went out and "
              f"back since; maps: {region_maps(a, n)}; agent: "
              f"{a.err()[-600:]!r}")
        a.ok(f"check 1 0 {n}")


def view_pages(pid):
    """Pages present in pid's shared mappings of the pool: an agent's
    view, where it reads pool pages to compare them, or the daemon's
    own mapping."""
    n = 0
    with open(f"/proc/{pid}/maps") as f:
        for ln in f:
            v = ln.split()
            if len(v) < 6 or "samepage-pool" not in ln or v[1][3] != "s":
                continue
            s, end = (int(x, 16) for x in v[0].split("-"))
            with open(f"/proc/{pid}/pagemap", "rb") as pm:
                pm.seek(s // 4096 * 8)
                left = (end - s) // 4096
                while left:
                    raw = pm.read(8 * min(left, 65536))
                    if not raw:
                        break
                    n += sum(1 for (x,) in struct.iter_unpack("<Q", raw)
                             if x >> 63)
                    left -= len(raw) // 8
    return n


def pool_emptied(e, a, b, after):
    """Wait until the pool holds no page; a and b are the programs."""
    st = wait_for(lambda: (lambda s: s if s["pool_pages"] == 0
                           else None)(e.d.status()), 20)
    check(st, f"{e.d.status()['pool_pages']} pool pages left after "
          f"{after}; in the agents' views: {view_pages(a.pid)} and "
          f"{view_pages(b.pid)}")


def test_pool_freed_while_programs_live():
    """Pool pages nobody maps any more are freed while the programs that
    merged them still run: long runs and single pages, written over by
    both programs.  The agents' views of the pool must not hold them:
    until 2026-12-05 every pool page an agent had compared stayed
    present in its view, and the pool never shrank while a program
    lived (2,000 pages of 2,000 left after 20 s)."""
    n = 2000
    with Env() as e:
        a, b = twins(e, n)
        converge(e.d, "pages_sharing", n)
        for p, seed in ((a, 2), (b, 3)):
            p.ok(f"fill {seed} 0 {n}")
        pool_emptied(e, a, b, f"both programs wrote all {n}")
        # single pages: every other page equal in both again
        for p in (a, b):
            for pg in range(0, n, 2):
                p.ok(f"fill 4 {pg} 1")
        converge(e.d, "pages_sharing", n // 2)
        check(shared(a, b) == n // 2,
              f"{shared(a, b)} of {n // 2} single pages shared")
        for p, seed in ((a, 5), (b, 6)):
            for pg in range(0, n, 2):
                p.ok(f"fill {seed} {pg} 1")
        pool_emptied(e, a, b, "the single pages were written")
        for p in (a, b):
            check(view_pages(p.pid) == 0,
                  f"{view_pages(p.pid)} pool pages present in a view")
        # freed in the file too (punched), not only in the books: what
        # the daemon's mapping holds is the 256 pages it allocates ahead
        d = view_pages(e.d.proc.pid)
        check(d <= 256, f"{d} pages left in the pool file")
        for p, seed, own in ((a, 5, 2), (b, 6, 3)):
            for pg in range(0, n, 2):
                p.ok(f"check {seed} {pg} 1")
                p.ok(f"check {own} {pg + 1} 1")


if __name__ == "__main__":
    sys.exit(run_tests([
        test_two_processes_share,
        test_compare_in_place,
        test_check_without_pfns,
        test_meminfo_drops,
        test_copy_on_write,
        test_zero_pages_kernel_semantics,
        test_runs_map_as_one,
        test_one_content_maps_by_blocks,
        test_late_program_merges_when_first_seen,
        test_single_pages_leave_nothing_registered,
        test_unmerge_run2,
        test_unmerge_madvise,
        test_prctl_merge_any,
        test_prctl_survives_exec,
        test_prctl_holds_in_forked_children,
        test_pages_shared_after_fork_merge,
        test_zero_pages_shared_after_fork_merge,
        test_scanning_copies_nothing_after_fork,
        test_huge_pages_merge,
        test_runs_across_vma_boundaries,
        test_malloc_memory_merges,
        test_prctl_takes_malloc_memory,
        test_refuses_what_ksm_refuses,
        test_protection_kept,
        test_readonly_writes_fault_during_merge,
        test_readonly_pages_put_back_stay_readonly,
        test_pool_freed_while_programs_live,
    ]))
