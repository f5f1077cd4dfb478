#!/usr/bin/env python3
"""Kernels without UFFDIO_MOVE (before Linux 6.8), played on this one
with SAMEPAGE_FAULT=nomove: the agent's userfaultfd is opened without
MOVE.  By default such a program runs unmerged and says why in one line;
with SAMEPAGE_NO_PIN_CHECK=1 it merges by write-protection instead, and
the status says that pinned pages are not detected.  The tests of rule
zero that do not need a pin check run again in that mode."""
import json
import os
import select
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sptest import Env, check, converge, run_tests, shared  # noqa: E402
from test_merge import test_two_processes_share  # noqa: E402
from test_safety import (test_hammer_no_lost_writes,  # noqa: E402
                         test_raw_remap_during_merge,
                         test_verify_failures_restore_pages)

WP = {"SAMEPAGE_FAULT": "nomove", "SAMEPAGE_NO_PIN_CHECK": "1"}


def wp_twins(e, n, fault=None, **kw):
    """twins() in write-protection mode; the first with fault too."""
    ps = []
    for i in range(2):
        env = dict(WP)
        if fault and not i:
            env["SAMEPAGE_FAULT"] += "," + fault
        p = e.proc(env=env, **kw)
        p.map(n)
        p.ok(f"fill 1 0 {n}")
        p.ok("merge")
        ps.append(p)
    return ps


def test_without_move_merging_is_off():
    """No UFFDIO_MOVE and no opt-in: one line names the cause and the
    way out, nothing is merged, the program runs and exits as it would."""
    with Env(pages_to_scan=4000, sleep_millisecs=1) as e:
        ps = [e.proc(env={"SAMEPAGE_FAULT": "nomove"}) for _ in range(2)]
        for p in ps:
            p.map(2000)
            p.ok("fill 1 0 2000")
            p.ok("merge")
        time.sleep(2)
        st = e.d.status()
        check(st["pages_sharing"] == 0 and st["clients"] == 0,
              f"merged without MOVE: sharing {st['pages_sharing']}, "
              f"clients {st['clients']}")
        check(shared(*ps) == 0, "pages shared")
        for p in ps:
            p.ok("check 1 0 2000")
            check(p.quit() == 0, "program failed")
            lines = [x for x in p.stderr.splitlines() if x.strip()]
            check(len(lines) == 1, f"want one line, got {lines}")
            check("UFFDIO_MOVE" in lines[0] and
                  "SAMEPAGE_NO_PIN_CHECK=1" in lines[0],
                  f"line does not name cause and way out: {lines[0]}")


def test_wp_merges_and_says_so():
    """Opted in: the same sharing, zero pages and counters as with MOVE
    (test_two_processes_share), the mode in the status and in one line
    of the program's, and copy-on-write after the merge."""
    test_two_processes_share(env=WP)
    with Env() as e:
        a, b = wp_twins(e, 2000)
        converge(e.d, "pages_sharing", 2000)
        check(shared(a, b) == 2000, f"{shared(a, b)} of 2000 shared")
        table = e.d.cli("status").stdout
        check("write-protection, pinned pages not detected, on 2 of 2"
              in table, "status does not say the mode:\n" + table)
        js = json.loads(e.d.cli("status", "--json").stdout)
        check([p["safety"] for p in js["processes"]] ==
              ["write-protect"] * 2, "json safety")
        a.ok("write 5 7")
        check(a.cmd("check 1 5 1") != "ok", "write lost")
        a.ok("check 1 6 1994")
        b.ok("check 1 0 2000")
        check(shared(a, b) == 1999, f"{shared(a, b)} shared after a write")
        a.quit()
        check("without the pinned-page check" in a.stderr,
              "the program did not say the mode: " + a.stderr)


def test_wp_hammer_no_lost_writes():
    """Writer threads hammer pages while they are write-protected,
    compared and replaced under them: no write lost in a million."""
    test_hammer_no_lost_writes(pair=wp_twins)


def test_wp_writes_wait_during_merge():
    """Writer threads write pages and keep what they wrote, while each
    merge is held 200 ms between the comparison and the replacement
    (SAMEPAGE_FAULT=delay): a write in that window must wait for the
    pool mapping and land on the program's own copy of it.  Merging
    runs only while the threads write.  (The pages merged are read from
    the daemon meanwhile, not from the agent, whose figures wait for its
    lock, which merges held this long keep.)"""
    n = 2000
    with Env(pages_to_scan=4000, sleep_millisecs=1, run=0) as e:
        a, b = wp_twins(e, n, fault="delay")
        a.p.stdin.write("hammer 2 3 keep 20000\n")
        a.p.stdin.flush()
        e.d.set(run=1)
        merged = 0
        while not select.select([a.p.stdout], [], [], 0.05)[0]:
            merged = max([merged] + [
                p["ksm_merging_pages"] for p in e.d.status()["processes"]
                if p["pid"] == a.pid])
        out = a.p.stdout.readline().strip()
        e.d.set(run=0)
        check(out.startswith("ok "), f"hammer -> {out}")
        writes, lost = (int(x) for x in out.split()[1:])
        a.ok(f"check 1 0 {n}")  # every word was restored
        check(lost == 0, f"{lost} of {writes} writes lost")
        check(merged > 0, "no merge happened while writing")
        b.ok(f"check 1 0 {n}")
        print(f"  {writes} writes, up to {merged} pages merged at once",
              flush=True)


def test_wp_raw_remap_during_merge():
    """A raw munmap and mmap in the place of pages that are protected
    and held 200 ms after their comparison: the fresh mapping is the
    program's and keeps its bytes (no pool page, no zero page is mapped
    over it); the rest is merged and intact."""
    test_raw_remap_during_merge(pair=wp_twins)


def test_wp_failures_restore_pages():
    """Each merge fails at verification or at the mapping, also after
    the kernel cleared the range (a gap: the pages, never moved out, are
    put back from the pool, whose bytes they were compared equal to)."""
    test_verify_failures_restore_pages(env=WP,
                                       faults=("verify", "map", "mapgap"))


def test_wp_munmap_dontneed_and_unmerge():
    """The program's own munmap and DONTNEED while merging, then run=2:
    contents intact, nothing shared after."""
    n = 8000
    with Env(pages_to_scan=2000, sleep_millisecs=1) as e:
        a, b = wp_twins(e, n)
        a.ok("dontneed 100 50")
        a.ok("munmap 7000 1000")
        a.ok("write 3 9")
        converge(e.d, "pages_sharing", 6900)
        check(a.cmd("check 0 100 50") == "ok", "DONTNEED'd pages not zero")
        check(a.cmd("check 1 3 1") != "ok", "write lost")
        a.ok("check 1 4 96")
        a.ok("check 1 150 6850")
        e.d.set(run=2)
        check(shared(a, b, 0, 7000) == 0, "pages shared after run=2")
        a.ok("check 1 150 6850")
        b.ok(f"check 1 0 {n}")


if __name__ == "__main__":
    sys.exit(run_tests([
        test_without_move_merging_is_off,
        test_wp_merges_and_says_so,
        test_wp_hammer_no_lost_writes,
        test_wp_writes_wait_during_merge,
        test_wp_raw_remap_during_merge,
        test_wp_failures_restore_pages,
        test_wp_munmap_dontneed_and_unmerge,
    ]))
