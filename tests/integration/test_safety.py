#!/usr/bin/env python3
"""Rule zero: a program under samepage reads and writes exactly what it
would without it.  Each test here tries hard to make a write get lost."""
import contextlib
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sptest import (MEMFILL, PAGE, Env, Skip, check, converge,  # noqa: E402
                    sanitizer_build,
                    map_count, pool_vmas, run_tests, shared, twins,
                    wait_for)


def hammer_rounds(a, n, line, min_writes=0, verify=None):
    """Run memfill's `line` (a hammer) in a at least 3 times and until
    min_writes writes; after each, all n pages are checked (every word
    was restored): verify(), or all of seed 1.  Returns writes, writes
    lost, pages merged meanwhile."""
    writes = lost = rounds = merged = 0
    while writes < min_writes or rounds < 3:
        m0 = int(a.stats()["merged"])
        w, lo = (int(x) for x in a.ok(line).split())
        merged += int(a.stats()["merged"]) - m0
        writes += w
        lost += lo
        rounds += 1
        if verify:
            verify()
        else:
            a.ok(f"check 1 0 {n}")
    return writes, lost, merged


def test_hammer_no_lost_writes(pair=twins):
    """Writer threads hammer pages while they are merged under them.
    pair: twins, or test_writeprotect's."""
    n = 20000
    with Env(pages_to_scan=4000, sleep_millisecs=1) as e:
        a, b = pair(e, n)
        writes, lost, merged_during = hammer_rounds(a, n, "hammer 2 1",
                                                    1_000_000)
        check(lost == 0, f"{lost} of {writes} writes lost")
        check(merged_during > 0, "no merge happened while hammering")
        b.ok(f"check 1 0 {n}")
        print(f"  {writes} writes, {merged_during} pages merged meanwhile",
              flush=True)


def hammer_single_pages(e, n, lines, env=None):
    """single_page_twins (env: the first one's), opted in; memfill's
    hammer lines run in the first (hammer_rounds) while they merge.  No
    write may be lost, and pages must merge meanwhile.  Returns both,
    the writes and the pages merged meanwhile."""
    a, b = single_page_twins(e, n, env=env)
    for p in (a, b):
        p.ok("merge")
    writes, lost, merged = 0, 0, 0
    for line in lines:
        w, lo, m = hammer_rounds(
            a, n, line, verify=lambda: check_single_page(a, 2, n))
        writes, lost, merged = writes + w, lost + lo, merged + m
    check(lost == 0, f"{lost} of {writes} writes lost")
    check(merged > 0, "no page merged while hammering")
    return a, b, writes, merged


def test_hammer_single_pages_no_lost_writes():
    """The same where every duplicate is a single page (every other
    page), as scattered duplicates are: the agent merges them in groups
    (merge.c, merge_group), and writers hammer pages while a group is
    out, mapped and read back; with keep, each thread's last word in
    each page must still be there at the end of the round."""
    n = 8000
    with Env(pages_to_scan=4000, sleep_millisecs=1) as e:
        # keep first, while the first merges go on
        a, b, writes, merged_during = hammer_single_pages(
            e, n, ("hammer 2 1 keep 200", "hammer 2 1"))
        check_single_page(b, 3, n)
        print(f"  {writes} writes, {merged_during} pages merged meanwhile",
              flush=True)


def test_remote_reads_never_see_wrong_bytes():
    """Another process reading the program's memory (/proc/PID/mem, as a
    debugger or ptrace does) while pages are merged and unmerged over and
    over gets the right bytes or, for a page moved out at that instant,
    EIO: the kernel cannot make such a read wait (handle_userfault
    fails faults that may not be retried).  Never zeros or another
    page's bytes."""
    import random
    n = 4000
    with Env(pages_to_scan=4000, sleep_millisecs=1) as e:
        a, b = e.proc(), e.proc()
        for p in (a, b):
            p.map(n)
            p.ok(f"fill 1 0 {n}")
        fd = os.open(f"/proc/{a.pid}/mem", os.O_RDONLY)
        try:
            want = os.pread(fd, n * PAGE, a.addr)
            check(len(want) == n * PAGE, "short read before merging")
            for p in (a, b):
                p.ok("merge")
            stop = threading.Event()
            cycles = [0]

            def churn():
                while not stop.is_set():
                    a.ok("unmerge")
                    a.ok("merge")
                    time.sleep(0.2)
                    cycles[0] += 1

            th = threading.Thread(target=churn)
            th.start()
            good = eio = 0
            wrong = []
            rnd = random.Random(1)
            end = time.monotonic() + 4
            try:
                while time.monotonic() < end:
                    pg = rnd.randrange(n - 16)
                    try:
                        got = os.pread(fd, 16 * PAGE, a.addr + pg * PAGE)
                    except OSError as ex:
                        check(ex.errno == 5, f"read failed: {ex}")
                        eio += 1
                        continue
                    # a read that meets a page moved out stops there
                    if len(got) < 16 * PAGE:
                        eio += 1
                    if got != want[pg * PAGE:pg * PAGE + len(got)]:
                        wrong.append(pg)
                    good += 1
            finally:
                stop.set()
                th.join()
        finally:
            os.close(fd)
        check(not wrong, f"{len(wrong)} reads saw wrong bytes, first at "
              f"page {wrong[:1]}")
        check(good > 1000, f"only {good} reads succeeded")
        check(cycles[0] >= 5, f"only {cycles[0]} merge cycles")
        a.ok(f"check 1 0 {n}")
        b.ok(f"check 1 0 {n}")
        print(f"  {good} reads right, {eio} EIO, {cycles[0]} merge "
              "cycles", flush=True)


def test_unmerge_while_writing():
    """Unmerging copies pool pages into fresh anonymous mappings that
    replace them (so that they can merge again); writer threads hammer
    the pages meanwhile.  SAMEPAGE_FAULT=slowunmerge holds each copy of
    64 pages or more 20 ms before it replaces the pages.  No write may be lost."""
    n = 20000
    with Env(pages_to_scan=4000, sleep_millisecs=1) as e:
        writes = lost = 0
        for rnd in range(3):
            a, b = twins(e, n, seed=rnd + 1, fault="slowunmerge")
            converge(e.d, "pages_sharing", n)
            a.p.stdin.write("hammer 2 2 keep 400\n")
            a.p.stdin.flush()
            time.sleep(0.1)
            e.d.set(run=2)  # returns once every client has unmerged
            out = a.p.stdout.readline().strip()
            check(out.startswith("ok "), f"hammer -> {out}")
            w, lo = (int(x) for x in out.split()[1:])
            writes += w
            lost += lo
            check(lost == 0, f"round {rnd}: {lost} of {writes} writes lost")
            a.ok(f"check {rnd + 1} 0 {n}")  # every word was restored
            b.ok(f"check {rnd + 1} 0 {n}")
            check(shared(a, b) == 0, "pages shared after run=2")
            check(pool_vmas(b.pid) == 0,
                  f"{pool_vmas(b.pid)} pool mappings left in B")
            e.d.set(run=1)
            for p in (a, b):
                p.quit()
        print(f"  {writes} writes during unmerges", flush=True)


def test_unmerge_in_place_while_writing():
    """Where unmerging cannot move a run into a fresh mapping, it breaks
    copy-on-write in place, and where that fails as a whole (a hole
    left by a raw munmap, a read-only page), page by page.  The program
    rewrites every page meanwhile: no byte may be written back over
    its.  SAMEPAGE_FAULT=breakcow takes both fallbacks, and holds each
    byte written back through /proc/self/mem 1 ms."""
    n, ro = 2000, 100  # the first ro pages of a read-only
    with Env(pages_to_scan=4000, sleep_millisecs=1) as e:
        a, b = twins(e, n, fault="breakcow")
        a.ok(f"mprotect 0 {ro} 1")
        converge(e.d, "pages_sharing", n)
        check(shared(a, b) == n, f"{shared(a, b)} of {n} shared")
        unmerge = threading.Thread(target=e.d.set, kwargs={"run": 2})
        unmerge.start()
        time.sleep(0.05)
        a.ok(f"fill 2 {ro} {n - ro}")
        unmerge.join()
        a.ok(f"check 1 0 {ro}")
        a.ok(f"check 2 {ro} {n - ro}")
        b.ok(f"check 1 0 {n}")
        check(shared(a, b) == 0, "pages shared after run=2")
        check(all(p[0] and not p[1] for p in a.pagemap(0, ro)),
              "read-only pages not given private copies")


def test_odirect_reads_while_merging():
    """O_DIRECT reads into pages that are being merged: the device
    writes pages pinned for it, which UFFDIO_MOVE refuses.  Every read's
    data must arrive and every other byte stay as it was.  In the second
    round the pages are shared with a forked child too, which the agent
    gives copies of their own to merge them, and a pin to read into
    them."""
    n = 20000
    d = tempfile.mkdtemp(prefix="sptest-odirect-", dir="/var/tmp")
    path = os.path.join(d, "blocks")
    try:
        with Env(pages_to_scan=1000, sleep_millisecs=5) as e:
            reads = merged = pinned = changed = 0
            for rnd in range(3):
                a, b = e.proc(), e.proc()
                for p in (a, b):
                    p.map(n)
                    p.ok(f"fill 1 0 {n}")
                if rnd == 0:
                    a.ok(f"mkfile {path}")
                m0 = int(a.stats()["merged"])
                if rnd == 1:
                    e.d.set(run=0)
                    a.ok("forkmap 0")
                for p in (a, b):
                    p.ok("merge")
                e.d.set(run=1)
                out = a.cmd(f"direct 2 2 {path}")
                if out.startswith("err odirect"):
                    raise Skip(f"O_DIRECT refused in {d}: {out}")
                check(out.startswith("ok "), f"direct -> {out}")
                r, bad = (int(x) for x in out.split()[1:])
                st = a.stats()
                merged += int(st["merged"]) - m0
                pinned += int(st["pinned"])
                changed += int(st["changed"])
                reads += r
                check(bad == 0, f"round {rnd}: {bad} of {r} reads "
                      "did not arrive")
                a.ok(f"check 1 0 {n}")
                b.ok(f"check 1 0 {n}")
                if rnd == 1:
                    check(a.ok("wait") == "0", "the child saw wrong "
                          "contents")
                for p in (a, b):
                    p.quit()
            check(merged > 0, "nothing merged while reading")
            # pinned: MOVE refused a page in the middle of a read;
            # changed: a read had landed between the scan and the move
            print(f"  {reads} O_DIRECT reads; meanwhile {merged} pages "
                  f"merged, {pinned} refused as pinned, {changed} found "
                  "changed", flush=True)
    finally:
        subprocess.run(["rm", "-rf", d], check=False)


def pinned_twins(e):
    """Two processes with 2000 identical pages, opted in; the first has
    pages 0-15 registered as io_uring fixed buffers (pinned) before."""
    a, b = e.proc(), e.proc()
    for p in (a, b):
        p.map(2000)
        p.ok("fill 1 0 2000")
    r = a.cmd("pin 0 16")
    if r.startswith("err uring") or r.startswith("err register"):
        raise Skip(f"io_uring unavailable: {r}")
    check(r == "ok", r)
    for p in (a, b):
        p.ok("merge")
    converge(e.d, "pages_sharing", 2000 - 16)
    return a, b


def reads_land(a, b):
    """Reads into a's pinned pages 0, 5 and 15 (io_uring) land there;
    every other byte of a and b is as filled."""
    with tempfile.NamedTemporaryFile() as f:
        f.write(os.urandom(PAGE))
        f.flush()
        for pg in (0, 5, 15):
            a.ok(f"uread {f.name} {pg}")
            a.ok(f"cmpfile {f.name} {pg}")
    a.ok("check 1 16 1984")
    b.ok("check 1 0 2000")


def test_pinned_never_merged():
    """io_uring fixed buffers are pinned: never merged, reads land.  A
    page found pinned is tried again only every ninth pass."""
    with Env() as e:
        a, b = pinned_twins(e)
        time.sleep(0.5)
        check(shared(a, b, 0, 16) == 0, "pinned pages merged")
        check(shared(a, b, 16, 1984) == 1984, "the rest not merged")
        check(int(a.stats()["pinned"]) > 0, "pinned_skipped not counted")
        check(e.d.status()["pinned_skipped"] > 0, "status pinned_skipped")
        s0, p0 = e.d.status()["full_scans"], int(a.stats()["pinned"])
        time.sleep(1.5)
        s1, p1 = e.d.status()["full_scans"], int(a.stats()["pinned"])
        passes, tries = s1 - s0, (p1 - p0) / 16
        print(f"  {passes} passes, pinned pages tried {tries:.1f} times", flush=True)
        check(passes >= 18, f"only {passes} passes in 1.5 s")
        check(0 < tries <= passes / 9 + 2, f"pinned pages tried {tries:.1f} "
              f"times in {passes} passes")
        reads_land(a, b)


def merged_again_intact(a, b, n, seed, timeout):
    """All n pages (seed) of a and b merge again within timeout, and keep
    their bytes; a write of a's to one then lands in a alone."""
    check(wait_for(lambda: shared(a, b) >= n, timeout),
          f"{shared(a, b)} of {n} written pages merged again")
    for p in (a, b):
        p.ok(f"check {seed} 0 {n}")
    a.ok("write 7 99")
    b.ok(f"check {seed} 0 {n}")
    check(a.cmd(f"check {seed} 7 1") != "ok", "write to page 7 lost")


def test_written_pages_merge_again(fault=None):
    """Pages written after a merge, by both programs with the same bytes,
    are duplicates again: they merge again, as under KSM.  Bytes and
    copy-on-write hold after."""
    n = 3000
    with Env(pages_to_scan=4000, sleep_millisecs=1) as e:
        a, b = twins(e, n, fault=fault)
        converge(e.d, "pages_sharing", n)
        for p in (a, b):
            p.ok(f"fill 5 0 {n}")
        merged_again_intact(a, b, n, 5, 30)
        # the region was kept out of the agent's twin processes for a
        # moment (MADV_DONTFORK): a child of the program's has it again
        b.ok("forkmap 0 5")
        check(b.ok("wait") == "0", "the child did not see its region")


def test_written_pages_merge_again_by_copies():
    """The same, with the first program's written pages made anonymous
    again first (copies put in their place) and then merged, as pages
    that differ from the pool pages the daemon named are:
    SAMEPAGE_FAULT=nodirect leaves out merging them where they are."""
    test_written_pages_merge_again("nodirect")


def test_written_pages_merge_in_place():
    """Written pages that equal the pool pages the daemon names are
    merged where they are, once write-protected and shown unpinned by
    the twin: no copy is needed.  SAMEPAGE_FAULT=nocopy makes every copy
    fail, and all the pages still merge again, bytes and copy-on-write
    intact (with merging in place left out as well, none would)."""
    n = 3000
    with Env(pages_to_scan=4000, sleep_millisecs=1) as e:
        a, b, _ = written_twins(e, n, "nocopy")
        merged_again_intact(a, b, n, 1, 30)


def test_written_pages_merge_again_a_page_at_a_time():
    """When a run of written pages cannot be registered as a whole (one
    of its pages in a mapping userfaultfd refuses), the agent takes the
    run a page at a time, so that the others still merge again.  Fault
    regrun fails every registration of a run of more than one page: all
    the pages still merge again, with every byte intact."""
    n = 600
    with Env(pages_to_scan=4000, sleep_millisecs=1) as e:
        a, b = twins(e, n, fault="regrun")
        converge(e.d, "pages_sharing", n)
        for p in (a, b):
            p.ok(f"fill 5 0 {n}")
        merged_again_intact(a, b, n, 5, 60)


def test_small_stack():
    """A program run with a 64 KiB stack limit (RLIMIT_STACK, which also
    sizes its threads' default stacks) works as without samepage: the
    agent's calls on the program's threads, and the agent's own thread,
    fit.  Its pages merge, merge again once written, and unmerge, with
    every byte intact.  (Sending a message took 64 KiB of stack, and
    merging written pages again about 60 KiB of the agent thread's.)
    MADV_UNMERGEABLE takes little of the calling thread's stack: about
    8.5 KiB more than MADV_NORMAL did, about 3 KiB with its buffers
    static."""
    n = 3000
    with Env(pages_to_scan=4000, sleep_millisecs=1) as e:
        a, b = twins(e, n, prog=["prlimit", "--stack=65536", MEMFILL])
        converge(e.d, "pages_sharing", n)
        check(shared(a, b) == n, f"{shared(a, b)} of {n} shared")
        for p in (a, b):
            p.ok(f"fill 5 0 {n}")
        merged_again_intact(a, b, n, 5, 30)
        # MADV_UNMERGEABLE runs on the calling thread: on a's, from a
        # thread with a 64 KiB stack, against madvise(MADV_NORMAL) there
        # (not under a sanitizer: its frames are bigger, and TSan
        # refuses a thread a 64 KiB stack)
        if not sanitizer_build():
            a.ok("stackused 0")     # (the interposer, libc, thread start)
            base = int(a.ok("stackused 0"))
            used = int(a.ok("stackused 13"))
            check(used - base <= 6144, f"MADV_UNMERGEABLE took {used} "
                  f"bytes of the calling thread's stack, {base} without")
        b.ok("unmerge")
        check(shared(a, b) == 0, "shared after MADV_UNMERGEABLE")
        a.ok("check 5 0 7")
        a.ok(f"check 5 8 {n - 8}")
        b.ok(f"check 5 0 {n}")


def test_merge_again_while_writing(fault="slowagain"):
    """Pages written after a merge with the same bytes are merged again
    in place (each batch of them held 100 ms between the comparison and
    the mapping of the pool pages) while writer threads write into them:
    every write stays (each thread's last word in a page is checked at
    the end)."""
    n = 4000
    with Env(pages_to_scan=4000, sleep_millisecs=1) as e:
        a, b = twins(e, n, fault=fault)
        converge(e.d, "pages_sharing", n)
        writes = lost = merged = 0
        for _ in range(3):
            a.ok(f"fill 1 0 {n}")     # copies of their own, same bytes
            m0 = int(a.stats()["merged"])
            w, lo = (int(x) for x in a.ok("hammer 2 2 keep 5000").split())
            merged += int(a.stats()["merged"]) - m0
            writes += w
            lost += lo
            a.ok(f"check 1 0 {n}")
        check(lost == 0, f"{lost} of {writes} writes lost")
        check(merged > 0, "no page merged again while writing")
        b.ok(f"check 1 0 {n}")
        print(f"  {writes} writes, {merged} pages merged again meanwhile",
              flush=True)


def test_merge_again_by_copies_while_writing():
    """The same with the pages made anonymous again by copies (each
    batch held 100 ms between the copies and their mremaps), then
    merged: SAMEPAGE_FAULT=nodirect."""
    test_merge_again_while_writing("slowagain,nodirect")


def test_writes_never_left_waiting():
    """A write that meets a page the agent write-protected (to make a
    written copy anonymous again, or to unmerge) waits, and must be
    woken once the agent lets the range go, however often it faults
    again meanwhile.  Unregistering does not wake a write that waits on
    write-protection; woken before it, a writer that faults again on a
    page still protected waited for ever.  SAMEPAGE_FAULT=releasegap
    holds 50 ms between the two steps of letting go, notwin leaves every
    written page protected and then let go (no twin to tell pins), and
    writer threads hammer the pages all along: every hammer must
    return, within seconds, with no write lost.  With the old order
    (wake, then unregister) the first hammer never returned."""
    n = 4000
    with Env(pages_to_scan=4000, sleep_millisecs=1) as e:
        a, b = twins(e, n, fault="notwin,releasegap")
        converge(e.d, "pages_sharing", n)
        a.ok(f"fill 1 0 {n}")     # copies of their own, same bytes
        writes = 0
        for _ in range(3):
            a.p.stdin.write("hammer 2 2 keep 5000\n")
            a.p.stdin.flush()
            ready, _, _ = select.select([a.p.stdout], [], [], 30)
            check(ready, "a writer never came back: left waiting on a "
                  "write-protected page")
            out = a.p.stdout.readline().strip()
            check(out.startswith("ok "), f"hammer -> {out}")
            w, lost = (int(x) for x in out.split()[1:])
            check(lost == 0, f"{lost} of {w} writes lost")
            writes += w
            a.ok(f"check 1 0 {n}")
        b.ok(f"check 1 0 {n}")
        print(f"  {writes} writes, none left waiting", flush=True)


def test_writes_between_mapping_and_check_kept():
    """Single duplicate pages, so that each item is one page and its new
    mapping is checked by reading it back against the saved page
    (merge.c, read_back).  SAMEPAGE_FAULT=checkgap holds 2 ms between
    the mapping and the check while writer threads hammer the pages.  A
    write in that window lands in a private copy of the pool page (the
    kernel's copy-on-write); the check then sees other bytes, or the same
    once the word is put back, and neither outcome may lose a write: not
    at once (hammer), nor any time later (hammer keep: each thread's
    last word in each page is checked at the end).  Pages nobody wrote
    meanwhile still merge."""
    n = 4000
    with Env(pages_to_scan=4000, sleep_millisecs=1) as e:
        a, b, writes, merged = hammer_single_pages(
            e, n, ("hammer 2 1", "hammer 2 1 keep 200"),
            env={"SAMEPAGE_FAULT": "checkgap"})
        e.d.set(run=0)
        check_single_page_twins(a, b, n)
        print(f"  {writes} writes, {merged} pages merged meanwhile, "
              f"{shared(a, b)} shared at the end", flush=True)


def children_of(pid):
    """Processes whose parent is pid."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    return out


def test_twin_dies_with_the_program():
    """The agent's twin process (made to tell pinned pages, each held
    500 ms here) does not outlive a program killed meanwhile: it would
    hold the program's descriptors open for ever."""
    n = 2000
    with Env(pages_to_scan=4000, sleep_millisecs=1) as e:
        a, b = twins(e, n, fault="slowtwin")
        converge(e.d, "pages_sharing", n)
        for p in (a, b):
            p.p.stdin.write(f"fill 5 0 {n}\n")
            p.p.stdin.flush()
        twin = wait_for(lambda: children_of(a.pid), 20, 0.01)
        check(twin, "no twin seen")
        a.p.kill()
        a.p.wait()
        left = wait_for(lambda: not any(os.path.exists(f"/proc/{t}")
                                        for t in twin), 5)
        check(left, f"twin {twin} outlived the program")


def test_pinned_written_pages_not_merged_again():
    """A merged page pinned afterwards (io_uring fixed buffers: the pin
    breaks copy-on-write, the bytes stay the same) is a duplicate again,
    but is never made anonymous again to be merged: the device would go
    on writing into the old page.  Reads into it land.  Once the pins are
    dropped the pages are tried again, and merge."""
    with Env(pages_to_scan=4000, sleep_millisecs=1) as e:
        a, b = twins(e, 2000)
        converge(e.d, "pages_sharing", 2000)
        r = a.cmd("pin 0 16")
        if r.startswith("err uring") or r.startswith("err register"):
            raise Skip(f"io_uring unavailable: {r}")
        check(r == "ok", r)
        check(shared(a, b, 0, 16) == 0, "the pin did not break CoW")
        s0 = e.d.status()["full_scans"]
        check(wait_for(lambda: e.d.status()["full_scans"] >= s0 + 30, 20),
              "the daemon did not scan")
        check(shared(a, b, 0, 16) == 0, "pinned pages merged again")
        check(int(a.stats()["pinned"]) > 0, "pinned pages not counted")
        reads_land(a, b)
        # once the pins are gone they are tried again, and merge
        for pg in (0, 5, 15):
            a.ok(f"fill 1 {pg} 1")
        a.ok("unpin")
        check(wait_for(lambda: shared(a, b, 0, 16) == 16, 20),
              f"{shared(a, b, 0, 16)} of 16 pages merged once unpinned")
        a.ok("check 1 0 2000")


def written_twins(e, n, fault):
    """Two programs with n merged pages; then the first (with
    SAMEPAGE_FAULT=fault) writes the same bytes into all of them: copies
    of its own, duplicates again.  Returns both and the first's agent
    figures from before the writes."""
    a, b = twins(e, n, fault=fault)
    converge(e.d, "pages_sharing", n)
    before = a.stats()
    a.ok(f"fill 1 0 {n}")
    return a, b, before


def test_pin_after_twin_not_merged_again(fault="latepin"):
    """A page pinned for reading once the twin has shown it unpinned (a
    device that reads from it: SAMEPAGE_FAULT=latepin pins every other
    page between the comparison and the mapping of the pool pages, as
    process_vm_readv does) is not merged again: the device would go on
    reading the old page and miss the program's writes.  The pin makes
    the page the program's own, no longer shared with the twin, and that
    is checked right before each mapping.  The pages are tried again
    after the wait, and all merge in the end (each round pins every
    second page of a batch: a page alone is left be)."""
    n = 512
    with Env(pages_to_scan=4000, sleep_millisecs=1) as e:
        a, b, before = written_twins(e, n, fault)
        p0 = int(before["pinned"])
        check(wait_for(lambda: int(a.stats()["pinned"]) - p0 >= n // 4, 30),
              f"{int(a.stats()['pinned']) - p0} pages seen pinned, want "
              f">= {n // 4}")
        merged_again_intact(a, b, n, 1, 60)


def test_pin_after_twin_not_made_anonymous():
    """The same where the pages are made anonymous again by copies
    (SAMEPAGE_FAULT=nodirect): the pins come between the copies and
    their mremaps, and no pinned page is replaced."""
    test_pin_after_twin_not_merged_again("latepin,nodirect")


def write_protected(p, page):
    """Is the page write-protected by userfaultfd (pagemap bit 57)?"""
    with open(f"/proc/{p.pid}/pagemap", "rb") as f:
        f.seek((p.addr // PAGE + page) * 8)
        return bool(int.from_bytes(f.read(8), "little") >> 57 & 1)


def test_device_write_before_twin_kept(fault="pretwin"):
    """A device that writes into a page it has pinned, and lets go of it
    (an O_DIRECT read that ends), before the twin has looked: the write
    is never lost, for the pages are compared after the twin.  Merged
    pages are pinned as io_uring fixed buffers (the pin gives each a
    copy of the program's own, the same bytes: duplicates again).  While
    the agent holds them write-protected to merge them again, 300 ms
    before the twin (SAMEPAGE_FAULT=pretwin), a read lands in page 0
    through the pin (IORING_OP_READ_FIXED: the kernel writes the page
    itself, not through the page tables, and write-protection does not
    stop it), and the pins go.  Compared before that, page 0 would equal
    its pool page and be merged over, the read lost."""
    n = 64
    with Env(pages_to_scan=4000, sleep_millisecs=1) as e:
        a, b = twins(e, n, fault=fault)
        converge(e.d, "pages_sharing", n)
        r = a.cmd("pin 0 16")
        if r.startswith("err uring") or r.startswith("err register"):
            raise Skip(f"io_uring unavailable: {r}")
        check(r == "ok", r)
        check(wait_for(lambda: write_protected(a, 0), 30, step=0.002),
              "page 0 never write-protected to be merged again")
        with tempfile.NamedTemporaryFile() as f:
            f.write(os.urandom(PAGE))
            f.flush()
            a.ok(f"uread {f.name} 0")
            a.ok("unpin")
            # still in the hold: the twin has not looked yet
            check(write_protected(a, 0),
                  "the read and the unpin came after the hold")
            check(wait_for(lambda: shared(a, b, 1, 15) == 15, 30),
                  f"{shared(a, b, 1, 15)} of 15 unpinned pages merged again")
            a.ok(f"cmpfile {f.name} 0")
        check(shared(a, b, 0, 1) == 0, "page 0 merged")
        a.ok(f"check 1 1 {n - 1}")
        b.ok(f"check 1 0 {n}")


def test_device_write_before_twin_kept_by_copies():
    """The same where written pages are made anonymous again by copies
    (SAMEPAGE_FAULT=nodirect): the copies too are made after the twin,
    and page 0's holds the read."""
    test_device_write_before_twin_kept("pretwin,nodirect")


def hammer_forked(e, a, n, want):
    """a (n pages, seed 1, merging off) forks a child that keeps the
    region; merging goes on while writers hammer a's pages: no write
    lost, more than want pages merged in a meanwhile, the child's bytes
    intact, and no page taken for pinned."""
    a.ok("forkmap 0")
    e.d.set(run=1)
    writes, lost, merged = hammer_rounds(a, n, "hammer 2 1 keep 2000")
    check(lost == 0, f"{lost} of {writes} writes lost")
    check(merged > want, f"only {merged} pages merged in the parent while "
          f"hammering, want more than {want}")
    check(a.ok("wait") == "0", "the child saw wrong contents")
    st = e.d.status()
    check(st["pinned_skipped"] == 0,
          f"pinned_skipped {st['pinned_skipped']}: none is pinned")
    print(f"  {writes} writes, {merged} pages merged meanwhile", flush=True)


def test_fork_shared_pages_while_writing():
    """Pages shared with a child since fork are given copies and merged
    while writer threads hammer them in the parent: no write lost, and
    the child keeps its bytes."""
    n = 8000
    with Env(pages_to_scan=4000, sleep_millisecs=1) as e:
        e.d.set(run=0)
        a, b = twins(e, n)
        # most pages unwritten: they merge only by being unshared
        hammer_forked(e, a, n, n // 2)
        b.ok(f"check 1 0 {n}")


def test_fork_shared_single_pages_while_writing():
    """The same with single pages, merged in groups: each page shared
    with the child is refused in its group, given a copy, and tried
    again alone.  The first program's pages all hold seed 1 (the child
    checks them so); the second's every other page is its own, so that
    every pair is a single page."""
    n = 8000
    with Env(pages_to_scan=4000, sleep_millisecs=1) as e:
        e.d.set(run=0)
        a, b = e.proc(), e.proc()
        for p in (a, b):
            p.map(n)
            p.ok(f"fill 1 0 {n}")
        for pg in range(1, n, 2):
            b.ok(f"fill 3 {pg} 1")
        for p in (a, b):
            p.ok("merge")
        hammer_forked(e, a, n, n // 4)
        check_single_page(b, 3, n)


def test_fork_child_and_gc():
    """A forked child keeps the merged contents though its parent
    rewrites them and the other sharer exits; the pool is freed only
    when nobody maps it."""
    with Env() as e:
        a, b = twins(e, 3000)
        converge(e.d, "pages_sharing", 3000)
        a.ok("fork")  # child checks seed 1 at 2 s and at 4 s
        a.ok("fill 2 0 3000")
        b.quit()
        check(a.ok("wait") == "0", "forked child saw wrong contents")
        a.ok("check 2 0 3000")
        a.quit()
        st = wait_for(lambda: (lambda s: s if s["pool_pages"] == 0
                               else None)(e.d.status()), 15)
        check(st, f"pool still holds {e.d.status()['pool_pages']} pages")


def test_freed_slots_reused_keep_contents():
    """Pool pages are freed while the programs live (the agents' views
    emptied) and their slots used again, round after round, while other
    pool pages stay mapped: in each round both programs take a new
    content and merge it, then one writes over half of it and the other
    keeps that half, alone on its pool pages, through a few GCs.  GC must
    free only what nobody maps (no page read as zeros: byte for byte)
    and free the rest; the 4,096 freed slots pool.c waits for before it
    reuses any are passed in the third round."""
    n, half = 3000, 1500
    with Env() as e:
        a, b = e.proc(), e.proc()
        for p in (a, b):
            p.map(n)
        for r in range(1, 6):
            seed = 10 + r
            for p in (a, b):
                p.ok(f"fill {seed} 0 {n}")
                if r == 1:
                    p.ok("merge")
            st = wait_for(lambda: (lambda s: s if s["pages_sharing"] >= n
                                   and s["pool_pages"] <= n + 64
                                   else None)(e.d.status()), 30)
            check(st, f"round {r}: not merged, or the last round's pool "
                  f"pages not freed: {e.d.status()}")
            check(shared(a, b) == n, f"round {r}: {shared(a, b)} shared")
            a.ok(f"fill {100 + r} 0 {half}")
            time.sleep(2.5)  # GCs, b alone on half of the pool pages
            b.ok(f"check {seed} 0 {n}")
            a.ok(f"check {100 + r} 0 {half}")
            a.ok(f"check {seed} {half} {n - half}")
        b.ok(f"fill 200 0 {half}")
        st = wait_for(lambda: (lambda s: s if s["pool_pages"] <= n - half
                               + 64 else None)(e.d.status()), 30)
        check(st, f"pool pages nobody maps not freed: {e.d.status()}")
        a.ok(f"check 105 0 {half}")
        b.ok(f"check 200 0 {half}")
        for p in (a, b):
            p.ok(f"check 15 {half} {n - half}")


def test_exec_stays_under_samepage():
    """An exec'd child is under samepage again through the environment."""
    with Env() as e:
        a = e.proc(prog=["sh", "-c", f"exec {MEMFILL}"])
        b = e.proc()
        for p in (a, b):
            p.map(1000)
            p.ok("fill 1 0 1000")
            p.ok("merge")
        check(a.stats()["active"] == "1", "agent not active after exec")
        converge(e.d, "pages_sharing", 1000)
        check(shared(a, b) == 1000, "exec'd program not merged")


def threads(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(next(ln.split()[1] for ln in f
                        if ln.startswith("Threads")))


def test_unshare_user_namespace():
    """unshare(CLONE_NEWUSER) is allowed only to a single-threaded process
    (unshare(1), bwrap and container runtimes make it): the agent stops
    its thread around the call and starts it again, and merging (on from
    then on) works in the new namespace.  A hundred calls (in 99
    children, then in the program): the thread must be out of the
    process by the time each call is made, not merely joined."""
    with Env(run=0) as e:
        a, b = twins(e, 1000)
        if threads(a.pid) != 2:
            raise Skip(f"{threads(a.pid)} threads, not the program's and "
                       "the agent's alone (a sanitizer's runtime has its "
                       "own): the kernel would refuse any unshare")
        r = a.cmd("unshare 100")
        check(r == "ok", f"unshare(CLONE_NEWUSER) under samepage: {r}")
        check(threads(a.pid) == 2,
              f"{threads(a.pid)} threads after unshare, want 2")
        e.d.set(run=1)
        converge(e.d, "pages_sharing", 1000)
        check(shared(a, b) == 1000, f"{shared(a, b)} of 1000 shared")
        a.ok("write 5 3")
        check(a.cmd("check 1 5 1") != "ok", "write lost")
        a.ok("check 1 6 994")
        b.ok("check 1 0 1000")


def test_signals_stay_with_the_program():
    """A signal the program blocks in its threads (to take it with sigwait
    or signalfd, as QEMU does with SIGIO and SIGALRM) stays pending for
    it: the agent's thread never takes the program's signals."""
    with Env() as e:
        a = e.proc()
        a.map(1000)
        a.ok("fill 1 0 1000")
        a.ok("merge")
        check(a.stats()["active"] == "1", "agent not active")
        r = a.cmd("sigblock")
        check(r == "ok", f"process-directed SIGUSR1: {r}")
        a.ok("check 1 0 1000")


def test_program_closes_and_reuses_descriptors():
    """A program that closes every descriptor it did not open
    (close_range) and places its own at fixed numbers (dup2) keeps them
    all, while merging goes on: the agent's are neither closed, nor
    written to, nor the program's taken."""
    with Env() as e:
        a, b = e.proc(), e.proc()
        for p in (a, b):
            p.map(3000)
            p.ok("fill 1 0 3000")
        a.ok("closefds")          # reopens 3..50 for itself
        fd = f"/proc/{a.pid}/fd"
        theirs = [n for n in range(1000, 1012) if os.path.exists(f"{fd}/{n}")]
        check(any(os.readlink(f"{fd}/{n}") == "anon_inode:[userfaultfd]"
                  for n in theirs),
              f"the agent's userfaultfd is not among 1000..1011: {theirs}")
        a.ok("dup2high 1000 1011")  # over the agent's: they must move
        for p in (a, b):
            p.ok("merge")
        converge(e.d, "pages_sharing", 3000)
        check(shared(a, b) == 3000, "not merged after the program's closes")
        check(a.stats()["active"] == "1", "agent stopped")
        a.ok("checkfds")
        for n in list(range(3, 51)) + list(range(1000, 1012)):
            check(os.path.exists(f"{fd}/{n}"), f"the program's fd {n} closed")
        for n in range(1000, 1012):
            check(os.readlink(f"{fd}/{n}") == "/dev/null",
                  f"fd {n} is {os.readlink(f'{fd}/{n}')}, not /dev/null")
        a.ok("write 7 9")
        a.ok("check 1 8 2992")
        a.ok("unmerge")
        check(shared(a, b) == 0, "shared after MADV_UNMERGEABLE")
        b.ok("check 1 0 3000")


def test_munmap_mremap_dontneed_while_merging():
    n = 8000
    with Env(pages_to_scan=2000, sleep_millisecs=1) as e:
        a, b = twins(e, n)
        # act while the first merges land
        wait_for(lambda: int(a.stats()["merged"]) > 0, 10, 0.002)
        a.ok("dontneed 100 50")
        a.ok("munmap 7000 1000")
        a.ok("write 3 9")
        check(a.cmd("check 0 100 50") == "ok", "DONTNEED'd pages not zero")
        newaddr = int(a.ok("mremap 7000"), 16)  # shrink, may move
        a.addr = newaddr
        a.npages = 7000
        a.ok("check 1 0 3")
        check(a.cmd("check 1 3 1") != "ok", "write before mremap lost")
        a.ok("check 1 4 96")
        a.ok("check 0 100 50")
        a.ok("check 1 150 6850")
        newaddr = int(a.ok("mremap 9000"), 16)  # grow
        a.addr = newaddr
        a.npages = 9000
        a.ok("fill 1 7000 2000")
        time.sleep(1)
        a.ok("check 1 4 96")
        a.ok("check 1 150 8850")
        a.ok("dontneed 0 9000")
        a.ok("check 0 0 9000")
        b.ok(f"check 1 0 {n}")
        check(e.d.proc.poll() is None, "daemon died")


def test_mremap_grow_keeps_pages():
    """Growing a merged range that cannot grow in place moves it, as the
    kernel moves a single VMA: pinned pages go along (a read into an
    io_uring fixed buffer shows at the new address), merged pages stay
    intact, the new tail reads zero."""
    with Env() as e:
        a, b = pinned_twins(e)
        a.ok("guard")
        old = a.addr
        a.addr = int(a.ok("mremap 3000"), 16)
        a.npages = 3000
        check(a.addr != old, "grew in place despite the guard page")
        a.ok("check 1 16 1984")
        a.ok("check 0 2000 1000")
        with tempfile.NamedTemporaryFile() as f:
            f.write(os.urandom(PAGE))
            f.flush()
            a.ok(f"uread {f.name} 5")
            a.ok(f"cmpfile {f.name} 5")
        a.ok("write 100 7")
        check(a.cmd("check 1 100 1") != "ok", "write after mremap lost")
        b.ok("check 1 0 2000")


def nothing_mapped_again(a, gone):
    """Nothing is mapped where a unmapped 100 pages from each of gone."""
    with open(f"/proc/{a.pid}/maps") as f:
        spans = [tuple(int(x, 16) for x in ln.split()[0].split("-"))
                 for ln in f]
    for first in gone:
        lo = a.addr + first * PAGE
        hi = lo + 100 * PAGE
        check(not any(s < hi and t > lo for s, t in spans),
              f"pages {first}..{first + 99} mapped again")


def test_raw_munmap_during_merge():
    """A raw munmap(2), which bypasses the agent's lock, lands while pages
    are out for comparison (each merge held open 200 ms): the program
    lives, what it kept is intact, and nothing is mapped again where it
    unmapped."""
    n = 4000
    with Env() as e:
        a, b = twins(e, n, fault="delay")
        gone = []
        for first in range(0, n, 400):
            time.sleep(0.1)
            a.ok(f"rawunmap {first} 100")
            gone.append(first)
        time.sleep(1)
        for first in range(0, n, 400):
            a.ok(f"check 1 {first + 100} 300")
        nothing_mapped_again(a, gone)
        b.ok(f"check 1 0 {n}")
        check(e.d.proc.poll() is None, "daemon died")


def spots_while_out(e, n, act, count=6):
    """single_page_twins of n pages, opted in, the first with each group
    held out 200 ms (SAMEPAGE_FAULT=delay); then count spots of 100 of
    the first's pages, each made (act(a, first)) as soon as a duplicate
    page in it shows not present in pagemap: out for a merge (moved out,
    or mapped and not yet read back).  Returns both programs and the
    spots' first pages, 1.5 s after the last."""
    a, b = single_page_twins(e, n, env={"SAMEPAGE_FAULT": "delay"})
    for p in (a, b):
        p.ok("merge")
    spots = []
    while len(spots) < count:
        out = []

        def some_out():
            out[:] = [pg for pg, m in enumerate(a.pagemap())
                      if pg % 2 == 0 and not m[0] and
                      not any(f - 75 <= pg < f + 125 for f in spots)]
            return out

        check(wait_for(some_out, 20, step=0.001),
              f"no page seen out after {len(spots)} spots")
        first = min(max(out[0] - 25, 0), n - 100)
        act(a, first)
        spots.append(first)
    time.sleep(1.5)
    return a, b, spots


def test_raw_munmap_during_merge_single_pages():
    """The same with single pages merged in groups, each group held out
    200 ms (SAMEPAGE_FAULT=delay), and each raw munmap made while a page
    in it is out for certain (spots_while_out)."""
    n = 4000
    with Env() as e:
        a, b, spots = spots_while_out(
            e, n, lambda a, first: a.ok(f"rawunmap {first} 100"))
        for pg in range(n):
            if not any(f <= pg < f + 100 for f in spots):
                a.ok(f"check {1 if pg % 2 == 0 else 2} {pg} 1")
        nothing_mapped_again(a, spots)
        check_single_page(b, 3, n)
        check(e.d.proc.poll() is None, "daemon died")


def remap_spots(a, spots, pause):
    """At each spot, 100 pages replaced by raw munmap and mmap, and new
    data of the program's in the first 50."""
    for first in spots:
        time.sleep(pause)
        a.ok(f"rawremap {first} 100")
        a.ok(f"fill 2 {first} 50")


def check_remapped(e, a, b, spots, kept):
    """The fresh mappings hold the new data and zeros; the kept pages
    after each spot, and all of b, are intact."""
    for first in spots:
        a.ok(f"check 2 {first} 50")
        a.ok(f"check 0 {first + 50} 50")
        a.ok(f"check 1 {first + 100} {kept}")
    b.ok(f"check 1 0 {b.npages}")
    check(e.d.proc.poll() is None, "daemon died")


def test_raw_remap_during_merge(pair=twins):
    """What free(3) and malloc(3) do behind the interposers: a raw munmap
    and a fresh mapping in the same place by raw mmap, while pages there
    are out for comparison (each merge held open 200 ms).  The fresh
    mapping is the program's: it reads zeros, keeps what the program
    writes into it at once, and no pool page is mapped over it.  The
    program lives and the rest is intact.  pair: twins, or
    test_writeprotect's."""
    n = 4000
    with Env() as e:
        a, b = pair(e, n, fault="delay")
        spots = range(0, n, 400)
        remap_spots(a, spots, 0.1)
        time.sleep(1.5)
        check_remapped(e, a, b, spots, 300)


def test_raw_remap_during_merge_single_pages():
    """The same with single pages merged in groups, each group held out
    200 ms (SAMEPAGE_FAULT=delay), and the raw munmap and mmap made
    while a page there is out for certain (spots_while_out).  The new
    data goes into the fresh mapping at once, over that page too; no
    pool page may be mapped over it."""
    n = 4000
    with Env() as e:
        a, b, spots = spots_while_out(
            e, n, lambda a, first: remap_spots(a, (first,), 0))
        for pg in range(n):
            spot = next((f for f in spots if f <= pg < f + 100), None)
            want = (1 if pg % 2 == 0 else 2) if spot is None else \
                2 if pg < spot + 50 else 0
            a.ok(f"check {want} {pg} 1")
        check_single_page(b, 3, n)
        check(e.d.proc.poll() is None, "daemon died")


def unmerge_under_way(e, n, fault):
    """Two programs with n merged pages (the first with
    SAMEPAGE_FAULT=fault), and run=2 under way on a thread: returns both
    and the thread."""
    a, b = twins(e, n, fault=fault)
    converge(e.d, "pages_sharing", n)
    unmerge = threading.Thread(target=e.d.set, kwargs={"run": 2})
    unmerge.start()
    return a, b, unmerge


def test_raw_remap_during_unmerge():
    """The same during run=2: while merged pages are being copied into
    anonymous mappings (each copy held 20 ms), a raw munmap and raw mmap
    put a fresh mapping of the program's in their place, which must not
    get the old pages mapped over it."""
    n = 8000
    with Env(pages_to_scan=4000, sleep_millisecs=1) as e:
        a, b, unmerge = unmerge_under_way(e, n, "slowunmerge")
        spots = range(0, n, 250)
        remap_spots(a, spots, 0.01)
        unmerge.join()
        check_remapped(e, a, b, spots, 150)


def test_agent_maps_nothing_in_holes():
    """The agent's own short-lived mappings (the copies it makes while
    unmerging and merging again) go into a window it keeps reserved,
    never where the kernel would place them: there they could land in a
    hole the program has just made with a raw munmap (libc's, in free),
    and a raw mmap(MAP_FIXED) of the program's into its hole would
    replace the agent's copy, which the agent would then move over the
    pages it unmerges: the program's new mapping gone from where it put
    it, and in its place the copy's bytes over its own.  Holes of 1,024
    pages (more than any copy) are made while the copies are held 20 ms
    (unmerging) and 100 ms (merging again), and watched: nothing may
    come into them, and every byte is intact after."""
    n = 8192
    with Env(pages_to_scan=4000, sleep_millisecs=1) as e:
        a, b, unmerge = unmerge_under_way(e, n, "slowunmerge")
        spots = range(1024, n, 2048)
        for first in spots:
            a.ok(f"holewatch {first} 1024 80")
        unmerge.join()
        for first in spots:
            a.ok(f"check 0 {first} 1024")
            a.ok(f"check 1 {first - 1024} 1024")
        b.ok(f"check 1 0 {n}")
    with Env(pages_to_scan=4000, sleep_millisecs=1) as e:
        a, b, before = written_twins(e, n, "slowagain")
        m0 = int(before["merged"])
        # once merging again has begun (after the writes' busy wait), in
        # the upper half, where batches of copies are still to come
        check(wait_for(lambda: int(a.stats()["merged"]) > m0, 20),
              "merging again did not begin")
        spots = range(n // 2, n, 2048)
        for first in spots:
            a.ok(f"holewatch {first} 1024 300")
        # (under a sanitizer twins come 10 s apart: its shadow is the
        # program's anonymous memory, which each twin costs faults)
        want = 1000 if sanitizer_build() else n - 2048
        check(wait_for(lambda: shared(a, b) >= want, 30),
              f"only {shared(a, b)} pages merged again")
        for first in spots:
            a.ok(f"check 0 {first} 1024")
            a.ok(f"check 1 {first + 1024} 1024")
        b.ok(f"check 1 0 {n}")
        check(e.d.proc.poll() is None, "daemon died")


def test_without_the_window():
    """Once the agent's window for its copies is lost (another thread's
    mapping came into it: SAMEPAGE_FAULT=nostage), no copy is made:
    written pages are not made anonymous again (nor merged in place
    here, SAMEPAGE_FAULT=nodirect: that needs no copy,
    test_written_pages_merge_in_place), and unmerging breaks
    copy-on-write in place, so the pages stay in pool mappings (with the
    window, run=2 leaves none: test_unmerge_run2).  Every byte stays as
    written."""
    n = 2000
    with Env(pages_to_scan=4000, sleep_millisecs=1) as e:
        a, b = twins(e, n, fault="nostage,nodirect")
        converge(e.d, "pages_sharing", n)
        a.ok(f"fill 1 0 {n // 2}")  # the same bytes: private copies
        time.sleep(4)   # past the writes' busy wait, and some passes
        check(shared(a, b) == n - n // 2,
              f"{shared(a, b)} shared, want the {n - n // 2} unwritten: "
              "written pages merged again without copies")
        e.d.set(run=2)
        check(shared(a, b) == 0, "pages shared after run=2")
        excl = sum(1 for m in a.pagemap() if m[0] and not m[1] and m[2])
        check(excl == n, f"{excl} of {n} pages private after run=2")
        check(pool_vmas(a.pid) > 0,
              "no pool mapping left: the pages were copied after all")
        for p in (a, b):
            p.ok(f"check 1 0 {n}")
        check(e.d.proc.poll() is None, "daemon died")


def test_raw_remap_during_merge_again(fault="slowagain"):
    """The same while pages written after their merge are merged again
    in place (each batch held 100 ms between the comparison and the
    mapping of the pool pages): the fresh mapping must not get the pool
    pages mapped over it."""
    n = 4000
    with Env(pages_to_scan=4000, sleep_millisecs=1) as e:
        a, b, before = written_twins(e, n, fault)
        m0 = int(before["merged"])
        spots = range(0, n, 400)
        for j, first in enumerate(spots):
            # in the hold of the batch that holds these pages: batches go
            # up through the region, 256 pages at most, and the agent lets
            # the stats call in between them (the pages remapped before
            # are not merged again)
            check(wait_for(lambda: int(a.stats()["merged"]) - m0 >=
                           first - 200 - 100 * j, 20),
                  f"merging again stopped before page {first}")
            time.sleep(0.04)
            a.ok(f"rawremap {first} 100")
            a.ok(f"fill 2 {first} 50")
        check(wait_for(lambda: shared(a, b) >= n - 1000, 30),
              f"only {shared(a, b)} pages merged again")
        check_remapped(e, a, b, spots, 300)


def test_raw_remap_during_merge_again_by_copies():
    """The same with the pages made anonymous again by copies first
    (SAMEPAGE_FAULT=nodirect), the hold between the copies and their
    mremaps: the fresh mapping must not get the copies moved over it."""
    test_raw_remap_during_merge_again("slowagain,nodirect")


def test_kill_daemon_mid_merge():
    """kill -9 of the daemon at several points of merging: every byte
    stays, merged pages stay valid and copy-on-write, merging stops."""
    n = 20000
    for delay in (0.0, 0.02, 0.1, 0.3, 1.0):
        with Env(pages_to_scan=3000, sleep_millisecs=1) as e:
            a, b = twins(e, n)
            time.sleep(delay)
            e.d.kill()
            time.sleep(0.2)
            for p in (a, b):
                p.ok(f"check 1 0 {n}")
            sh = shared(a, b)
            for pg in range(0, n, 997):
                a.ok(f"write {pg} 77")
            b.ok(f"check 1 0 {n}")
            for pg in range(0, n, 997):
                check(a.cmd(f"check 1 {pg} 1") != "ok",
                      f"write to page {pg} lost (delay {delay})")
            check(wait_for(lambda: a.stats()["active"] == "0", 5),
                  "agent still active with no daemon")
            check("daemon went away" in a.err(), "no line about the daemon")
            check(shared(a, b) <= sh, "merging went on")


def test_kill_daemon_mid_merge_single_pages():
    """The same while single pages merge in groups, killed as soon as
    the first have merged (checked to be mid-way), and once all have:
    every byte stays, writes land, and the agent stops."""
    n = 4000
    for mid in (True, False):
        with Env(pages_to_scan=3000, sleep_millisecs=1) as e:
            a, b = single_page_twins(e, n)
            for p in (a, b):
                p.ok("merge")
            check(wait_for(lambda: int(a.stats()["merged"]) >= 1 if mid
                           else shared(a, b) == n // 2, 20, step=0.001),
                  "nothing merged")
            e.d.kill()
            merged = int(a.stats()["merged"])
            check(merged < n // 2 if mid else merged == n // 2,
                  f"killed with {merged} of {n // 2} merged")
            time.sleep(0.2)
            check_single_page_twins(a, b, n)
            for pg in range(0, n, 98):
                a.ok(f"write {pg} 77")
            check_single_page(b, 3, n)
            for pg in range(0, n, 98):
                check(a.cmd(f"check 1 {pg} 1") != "ok",
                      f"write to page {pg} lost")
            check(wait_for(lambda: a.stats()["active"] == "0", 5),
                  "agent still active with no daemon")


def intact_without_daemon(a, b, n):
    """After the daemon's death: both programs have every byte of seed 1,
    a's writes land and b's bytes stay, and a's agent has stopped."""
    for p in (a, b):
        p.ok(f"check 1 0 {n}")
    for pg in range(0, n, 97):
        a.ok(f"write {pg} 77")
    b.ok(f"check 1 0 {n}")
    for pg in range(0, n, 97):
        check(a.cmd(f"check 1 {pg} 1") != "ok", f"write to {pg} lost")
    check(wait_for(lambda: a.stats()["active"] == "0", 5),
          "agent still active with no daemon")


def test_kill_daemon_mid_unmerge():
    """kill -9 of the daemon while run=2 is under way (each copy held
    20 ms): the agents finish what they do alone, every byte stays, and
    writes after it land."""
    n = 8000
    with Env(pages_to_scan=4000, sleep_millisecs=1) as e:
        a, b = twins(e, n, fault="slowunmerge")
        converge(e.d, "pages_sharing", n)
        unmerge = threading.Thread(
            target=lambda: e.d.cli("set", "run=2", check_rc=False))
        unmerge.start()
        time.sleep(0.05)
        e.d.kill()
        unmerge.join()
        check(wait_for(lambda: shared(a, b) == 0, 10),
              f"{shared(a, b)} pages still shared: an unmerge stopped")
        intact_without_daemon(a, b, n)


def test_kill_daemon_and_fork_mid_merge_again():
    """While pages written after their merge are made anonymous again
    (each batch held 100 ms between its copies and their mremaps), the
    program forks, and then the daemon is killed: the child has every
    byte, the program too, its writes land, and merging stops."""
    n = 4000
    with Env(pages_to_scan=4000, sleep_millisecs=1) as e:
        a, b, before = written_twins(e, n, "slowagain")
        m0 = int(before["merged"])
        check(wait_for(lambda: int(a.stats()["merged"]) > m0, 20),
              "nothing merged again")
        time.sleep(0.05)            # into a batch's hold
        a.ok("forkmap 0 1")         # (fork waits for the agent's lock)
        time.sleep(0.05)
        e.d.kill()
        time.sleep(0.3)
        check(a.ok("wait") == "0", "the child saw wrong bytes")
        intact_without_daemon(a, b, n)


def test_verify_failures_restore_pages(
        env=None, faults=("verify", "map", "mapgap", "moveback")):
    """Fault injection: every merge fails at verification, at the final
    mapping (mapgap: after the kernel cleared the range, which leaves a
    gap), or in moving pages back; the pages must come back intact.
    env: more of the environment (test_writeprotect)."""
    for what in faults:
        pe = dict(env or {})
        pe["SAMEPAGE_FAULT"] = ",".join(
            f for f in (pe.get("SAMEPAGE_FAULT"), what) if f)
        with Env() as e:
            ps = [e.proc(env=pe) for _ in range(2)]
            for p in ps:
                p.map(3000)
                p.ok("fill 1 0 3000")
                p.ok("merge")
            time.sleep(1.5)
            # mapgap leaves the range unmapped for an instant, as the
            # kernel would: a read then would fault.  Checked once no
            # merge is under way.
            e.d.set(run=0)
            time.sleep(0.5)
            for p in ps:
                p.ok("check 1 0 3000")
                p.ok("write 10 5")
                check(p.cmd("check 1 10 1") != "ok", f"write lost ({what})")
            if what != "moveback":
                check(shared(*ps) == 0, f"merged despite failing {what}")


def test_verify_failures_restore_single_pages():
    """The same with single pages, merged in groups: where each merge
    fails, every page of every group comes back intact."""
    n = 2000
    for what in ("verify", "map", "mapgap", "moveback"):
        with Env() as e:
            a, b = single_page_twins(e, n, env={"SAMEPAGE_FAULT": what})
            for p in (a, b):
                p.ok("merge")
            time.sleep(1.5)
            e.d.set(run=0)
            time.sleep(0.5)
            check_single_page_twins(a, b, n)
            a.ok("write 10 5")
            check(a.cmd("check 1 10 1") != "ok", f"write lost ({what})")
            if what != "moveback":
                check(shared(a, b) == 0, f"merged despite failing {what}")
            else:
                check(shared(a, b) > 0, "nothing merged (moveback)")


def test_stopped_client_does_not_hold_up_others():
    """A stopped program answers no merge requests.  The scanner waits for
    a busy client, but not for ever: the others still merge, and the
    stopped one's memory is intact when it runs again."""
    with Env() as e:
        a, b = e.proc(), e.proc()
        for p in (a, b):
            p.map(6000)
            p.ok("fill 1 0 6000")
        for pg in range(1, 6000, 2):     # duplicates at single pages only
            b.ok(f"write {pg} 7")
        a.ok("merge")
        b.ok("merge")
        a.p.send_signal(signal.SIGSTOP)
        try:
            c, d = twins(e, 2000, seed=5)
            ok = wait_for(lambda: shared(c, d) == 2000, 30)
            check(ok, f"others merged {shared(c, d)} of 2000 pages while "
                      "one program was stopped")
        finally:
            a.p.send_signal(signal.SIGCONT)
        a.ok("check 1 0 6000")
        for pg in range(0, 6000, 2):
            b.ok(f"check 1 {pg} 1")


def vmflags_at(pid, addr):
    """The VmFlags of the mapping holding addr, from smaps."""
    with open(f"/proc/{pid}/smaps") as f:
        inside = False
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                s, t = (int(x, 16) for x in head.split("-"))
                inside = s <= addr < t
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    return []


def test_dontneed_keeps_unmerged_mappings():
    """DONTNEED on the part of a region that holds no pool pages is the
    kernel's own: zeros, and the mapping keeps what the program set on it
    (here MADV_HUGEPAGE).  On merged pages it gives zeros too."""
    with Env() as e:
        a, b = e.proc(), e.proc()
        a.map(4000)
        a.ok("fill 1 0 2000")
        a.ok("fill 3 2000 2000")
        a.ok("hugepage 2000 2000")
        b.map(2000)
        b.ok("fill 1 0 2000")
        for p in (a, b):
            p.ok("merge")
        converge(e.d, "pages_sharing", 2000)
        check("hg" in vmflags_at(a.pid, a.addr + 3000 * PAGE),
              "MADV_HUGEPAGE not set to begin with")
        a.ok("dontneed 3000 10")
        a.ok("dontneed 0 10")
        check("hg" in vmflags_at(a.pid, a.addr + 3000 * PAGE),
              "DONTNEED on unmerged memory dropped MADV_HUGEPAGE")
        a.ok("check 0 3000 10")
        a.ok("check 0 0 10")
        a.ok("check 1 10 1990")
        a.ok("check 3 2000 1000")
        a.ok("check 3 3010 990")
        b.ok("check 1 0 2000")


def test_client_death_releases():
    with Env() as e:
        a, b = twins(e, 2000)
        converge(e.d, "pages_sharing", 2000)
        a.p.send_signal(signal.SIGKILL)
        a.p.wait()
        st = wait_for(lambda: (lambda s: s if s["clients"] == 1 and
                               s["pages_sharing"] == 0 else None)(
            e.d.status()), 10)
        check(st, "references of the dead client kept")
        b.ok("check 1 0 2000")
        b.quit()
        check(wait_for(lambda: e.d.status()["pool_pages"] == 0, 10),
              "pool not freed after both left")


@contextlib.contextmanager
def max_map_count(value):
    """vm.max_map_count set to value for the block, then put back."""
    path = "/proc/sys/vm/max_map_count"
    with open(path) as f:
        old = f.read().strip()
    try:
        with open(path, "w") as f:
            f.write(str(value))
        yield
    finally:
        with open(path, "w") as f:
            f.write(old)


def single_page_twins(e, n, env=None):
    """Two programs of n pages, not yet opted in, whose every other page
    is a duplicate (seed 1) and the others their own (seeds 2 and 3):
    every merge is one page, a mapping of its own.  env: the first
    one's environment, added."""
    a, b = e.proc(**({"env": env} if env else {})), e.proc()
    for p, own in ((a, 2), (b, 3)):
        p.map(n)
        p.ok(f"fill 1 0 {n}")
        for pg in range(1, n, 2):
            p.ok(f"fill {own} {pg} 1")
    return a, b


def check_single_page(p, own, n):
    """p's pages as single_page_twins made them, own its seed."""
    for pg in range(0, n, 2):
        p.ok(f"check 1 {pg} 1")
        p.ok(f"check {own} {pg + 1} 1")


def check_single_page_twins(a, b, n):
    for p, own in ((a, 2), (b, 3)):
        check_single_page(p, own, n)


def test_map_budget():
    """With vm.max_map_count lowered, merges stop at the budget, count
    refusals, and the program can still map memory of its own."""
    with max_map_count(2000):
        with Env() as e:
            a, b = single_page_twins(e, 8000)
            for p in (a, b):
                p.ok("merge")
            time.sleep(3)
            st = a.stats()
            budget = int(st["budget"])
            check(budget <= 2000 - 2000 // 8, f"budget {budget} too high")
            check(int(st["refused"]) > 0, "no refusal counted")
            check(map_count(a.pid) <= 2000, f"{map_count(a.pid)} mappings")
            check(e.d.status()["budget_refusals"] > 0, "status refusals")
            a.ok("mmapmany 100")
            check_single_page_twins(a, b, 8000)


def merging_settled(a):
    """Wait until a's merged count holds still for a second."""
    last = [-1]

    def settled():
        m, last[0] = last[0], int(a.stats()["merged"])
        return m == last[0] and m > 0
    check(wait_for(settled, 30, 1), "merging did not settle")


def test_budget_refusals_wait():
    """Pages the mapping budget refused are not tried again on every
    pass: each waits some passes first, as a pinned page does.  Until
    2026-12-05 every pass paired them again (a new pool page each time),
    and the agents moved each out, compared it and put it back: with two
    programs of 96,000 pages at the budget, 248,000 refusals in 20 s and
    92% of a CPU spent merging nothing.  Here the refusals over 18 passes
    are counted: at most a third of one per refused page and pass."""
    with max_map_count(2000):
        with Env(pages_to_scan=4000, sleep_millisecs=1) as e:
            a, b = single_page_twins(e, 8000)
            for p in (a, b):
                p.ok("merge")
            merging_settled(a)
            left = 4000 - shared(a, b)      # duplicates left unmerged
            check(left > 1000, f"only {left} pages refused")
            st = e.d.status()
            s0, r0 = st["full_scans"], st["budget_refusals"]
            check(wait_for(lambda: e.d.status()["full_scans"] >= s0 + 18,
                           60), "the daemon did not scan")
            st = e.d.status()
            per = (st["budget_refusals"] - r0) / (st["full_scans"] - s0) / \
                (2 * left)
            check(per <= 1 / 3, f"{per:.2f} refusals a refused page and "
                  "pass")
            print(f"  {per:.3f} refusals a refused page and pass "
                  f"({left} pages of each program refused)", flush=True)
            a.ok("mmapmany 100")
            check_single_page_twins(a, b, 8000)


def test_map_budget_sees_the_program_grow():
    """The program makes more mappings of its own than the reserve below
    vm.max_map_count after the agent last counted, and merging begins
    later: the agent counts again before it maps (its last count is over
    5 s old), so it stops at the budget, and the program can still map
    memory of its own.  By arithmetic alone the agent would have filled
    the reserve the program had already used, up to the kernel's limit."""
    limit = 1200
    with max_map_count(limit):
        with Env(pages_to_scan=4000, sleep_millisecs=1) as e:
            a, b = single_page_twins(e, 2400)
            a.ok("mmapmany 100")    # 200 mappings: more than the reserve
            time.sleep(5.5)
            for p in (a, b):
                p.ok("merge")
            merging_settled(a)
            budget = int(a.stats()["budget"])
            n = map_count(a.pid)
            check(n <= budget, f"{n} mappings, over the budget {budget} "
                  f"(vm.max_map_count {limit})")
            check(int(a.stats()["refused"]) > 0, "the budget refused nothing")
            a.ok("mmapmany 30")
            check_single_page_twins(a, b, 2400)


def test_written_pages_merge_again_once_under_budget():
    """Pages written after a merge that could not be made anonymous again
    for want of mappings (each one alone costs two) merge again once the
    program has given mappings back, as a page MOVE could not take for
    the same reason would."""
    n = 2000
    with max_map_count(2000), Env(pages_to_scan=4000,
                                  sleep_millisecs=1) as e:
        a, b = twins(e, n)
        converge(e.d, "pages_sharing", n)
        for p in (a, b):            # every other page alone: 1000 of them
            for pg in range(1, n, 2):
                p.ok(f"fill 5 {pg} 1")
        check(wait_for(lambda: all(int(p.stats()["refused"]) > 0
                                   for p in (a, b)), 30),
              "the mapping budget refused nothing")
        time.sleep(1)
        upper = range(n // 2 + 1, n, 2)
        behind = sum(1 for pg in upper if shared(a, b, pg, 1) == 0)
        check(behind > 0, "the budget held nothing back")
        for p in (a, b):            # give back about a thousand mappings
            p.ok(f"munmap 0 {n // 2}")
        check(wait_for(lambda: shared(a, b, n // 2, n // 2) == n // 2, 30),
              f"{n // 2 - shared(a, b, n // 2, n // 2)} of {n // 2} pages "
              f"still not shared ({behind} held back by the budget)")
        for p in (a, b):
            for pg in range(n // 2, n, 2):
                p.ok(f"check 1 {pg} 1")
                p.ok(f"check 5 {pg + 1} 1")
        print(f"  {behind} of {len(upper)} written pages held back by the "
              "budget, all merged again after", flush=True)


def proc_status(pid, key):
    """A field of /proc/PID/status, in kB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def pool_view(pid):
    """The smaps entry of the agent's read-only view of the pool."""
    with open(f"/proc/{pid}/smaps") as f:
        entries = f.read().split("\n")
    out, cur = None, None
    for line in entries:
        if line[:1].isalnum() and "-" in line.split(" ")[0]:
            cur = {"head": line}
            if "samepage-pool" in line and " r--s " in line:
                out = cur
        elif cur is not None and ":" in line:
            k, v = line.split(":", 1)
            cur[k] = v.strip()
    return out


def test_mlockall_while_merged():
    """mlockall(MCL_CURRENT | MCL_FUTURE), as QEMU's -overcommit
    mem-lock=on calls it, faults in every mapping, but never the agent's
    own: a fault on its scratch area (registered with userfaultfd) would
    wait forever, and its view of the pool is as big as RAM.  The
    program's memory is locked, the kernel's answers to the program stay
    its own (MADV_DONTNEED on locked memory: EINVAL), and every byte is
    intact.  The pages mlockall gave private copies merge again, locked,
    as under KSM.  Under ASan or TSan, whose mlockall does nothing and
    answers 0, nothing is taken for locked: MADV_DONTNEED gives zeros."""
    n = 3000
    with Env() as e:
        a, b = twins(e, n)
        converge(e.d, "pages_sharing", n)
        a.p.stdin.write("mlockall 3\n")
        a.p.stdin.flush()
        ready, _, _ = select.select([a.p.stdout], [], [], 30)
        check(ready, "mlockall(MCL_CURRENT | MCL_FUTURE) hung for 30 s")
        out = a.p.stdout.readline().strip()
        check(out == "ok", f"mlockall -> {out}")
        if sanitizer_build():
            a.ok("dontneed 0 100")
            a.ok("check 0 0 100")
            a.ok(f"check 1 100 {n - 100}")
            b.ok(f"check 1 0 {n}")
            return
        locked = proc_status(a.pid, "VmLck")
        check(locked >= n * PAGE // 1024,
              f"VmLck {locked} kB, the region is {n * PAGE // 1024} kB")
        view = pool_view(a.pid)
        check(view is not None, "no view of the pool in smaps")
        flags = view.get("VmFlags", "").split()
        check("lo" not in flags,
              f"the agent's pool view was locked: {view['VmFlags']}")
        rss = int(view["Rss"].split()[0])
        check(rss < 64 * 1024, f"the pool view was faulted in: {rss} kB")
        a.ok(f"check 1 0 {n}")
        b.ok(f"check 1 0 {n}")
        still = shared(a, b)
        # mlockall faulted the merged pages in for writing: private
        # copies, as under KSM; and as ksmd does, they merge again
        check(wait_for(lambda: shared(a, b) == n, 60),
              f"{shared(a, b)} of {n} pages merged again after mlockall")
        check(proc_status(a.pid, "VmLck") >= locked, "unlocked meanwhile")
        a.ok(f"check 1 0 {n}")
        # the kernel refuses MADV_DONTNEED on locked memory: so here
        out = a.cmd("dontneed 0 100")
        check(out == "err Invalid argument", f"dontneed locked -> {out}")
        a.ok(f"check 1 0 {n}")
        a.ok("write 5 9")
        b.ok(f"check 1 0 {n}")
        a.ok("munlockall")
        a.ok("dontneed 0 100")
        a.ok("check 0 0 100")
        a.ok(f"check 1 100 {n - 100}")
        print(f"  VmLck {locked} kB; {still} of {n} pages still shared "
              f"after mlockall", flush=True)


def test_pool_view_not_dumped():
    """A core dump reads every page of a shared mapping: the agent's view
    of the pool, as big as RAM, would be faulted in and written out.  It
    is marked VM_DONTDUMP ("dd" in smaps) for the kernel to skip."""
    with Env() as e:
        a = e.proc()
        a.map(16)
        view = wait_for(lambda: pool_view(a.pid), 10)
        check(view is not None, "no view of the pool in smaps")
        check("dd" in view.get("VmFlags", "").split(),
              f"pool view would be dumped: VmFlags {view.get('VmFlags')}")


def test_locked_memory_merges():
    """Programs that lock all their memory first (mlockall(MCL_CURRENT |
    MCL_FUTURE), QEMU's mem-lock=on) still merge, as on KSM: scratch is
    locked too, since UFFDIO_MOVE moves only between two locked mappings
    or two unlocked ones, and pool pages are mapped without being
    faulted in for writing.  Merged memory stays locked; writers racing
    the merges lose nothing; copy-on-write and unmerging work."""
    if sanitizer_build():
        raise Skip("ASan and TSan make mlockall(2) a no-op")
    n = 4000
    with Env(pages_to_scan=4000, sleep_millisecs=1) as e:
        ps = [e.proc() for _ in range(4)]
        for p in ps:
            p.ok("mlockall 3")
            p.map(n)
            p.ok(f"fill 1 0 {n}")
        for p in ps:
            p.ok("merge")
        a, b, c, d = ps
        # a's writers race the first merges (hammer restores every word;
        # the pages it writes stay private, so the count is c and d's)
        m0 = int(a.stats()["merged"])
        w, lost = (int(x) for x in a.ok("hammer 2 1").split())
        during = int(a.stats()["merged"]) - m0
        check(lost == 0, f"{lost} of {w} writes lost in locked memory")
        check(during > 0, "no merge while the writers ran")
        a.ok(f"check 1 0 {n}")
        both = wait_for(lambda: (lambda k: k if k == n else 0)(
            shared(c, d)), 60, 0.2)
        check(both == n, f"only {shared(c, d)} of {n} pages shared")
        for p in ps:
            locked = proc_status(p.pid, "VmLck")
            check(locked >= n * PAGE // 1024,
                  f"VmLck {locked} kB, the region is {n * PAGE // 1024} kB")
        c.ok("write 7 3")
        d.ok(f"check 1 0 {n}")
        out = d.cmd("dontneed 0 10")
        check(out == "err Invalid argument", f"dontneed locked -> {out}")
        d.ok(f"check 1 0 {n}")
        e.d.set(run=2)  # unmerge: private copies, still locked
        check(shared(c, d) == 0, f"{shared(c, d)} pages shared after run=2")
        c.ok(f"check 1 8 {n - 8}")
        for p in (a, b, d):
            p.ok(f"check 1 0 {n}")
        for p in ps:
            locked = proc_status(p.pid, "VmLck")
            check(locked >= n * PAGE // 1024,
                  f"after run=2: VmLck {locked} kB")
        print(f"  {both} of {n} locked pages shared; {w} writes, {during} "
              "pages merged meanwhile", flush=True)

if __name__ == "__main__":
    sys.exit(run_tests([
        test_hammer_no_lost_writes,
        test_hammer_single_pages_no_lost_writes,
        test_unmerge_while_writing,
        test_unmerge_in_place_while_writing,
        test_remote_reads_never_see_wrong_bytes,
        test_pinned_never_merged,
        test_written_pages_merge_again,
        test_written_pages_merge_again_by_copies,
        test_written_pages_merge_in_place,
        test_written_pages_merge_again_a_page_at_a_time,
        test_small_stack,
        test_merge_again_while_writing,
        test_merge_again_by_copies_while_writing,
        test_writes_never_left_waiting,
        test_writes_between_mapping_and_check_kept,
        test_twin_dies_with_the_program,
        test_pinned_written_pages_not_merged_again,
        test_pin_after_twin_not_merged_again,
        test_pin_after_twin_not_made_anonymous,
        test_device_write_before_twin_kept,
        test_device_write_before_twin_kept_by_copies,
        test_odirect_reads_while_merging,
        test_fork_shared_pages_while_writing,
        test_fork_shared_single_pages_while_writing,
        test_fork_child_and_gc,
        test_freed_slots_reused_keep_contents,
        test_exec_stays_under_samepage,
        test_unshare_user_namespace,
        test_signals_stay_with_the_program,
        test_program_closes_and_reuses_descriptors,
        test_munmap_mremap_dontneed_while_merging,
        test_mremap_grow_keeps_pages,
        test_raw_munmap_during_merge,
        test_raw_munmap_during_merge_single_pages,
        test_raw_remap_during_merge,
        test_raw_remap_during_merge_single_pages,
        test_raw_remap_during_unmerge,
        test_raw_remap_during_merge_again,
        test_raw_remap_during_merge_again_by_copies,
        test_agent_maps_nothing_in_holes,
        test_without_the_window,
        test_kill_daemon_mid_merge,
        test_kill_daemon_mid_merge_single_pages,
        test_kill_daemon_and_fork_mid_merge_again,
        test_kill_daemon_mid_unmerge,
        test_verify_failures_restore_pages,
        test_verify_failures_restore_single_pages,
        test_stopped_client_does_not_hold_up_others,
        test_dontneed_keeps_unmerged_mappings,
        test_client_death_releases,
        test_map_budget,
        test_budget_refusals_wait,
        test_map_budget_sees_the_program_grow,
        test_written_pages_merge_again_once_under_budget,
        test_mlockall_while_merged,
        test_pool_view_not_dumped,
        test_locked_memory_merges,
    ]))
