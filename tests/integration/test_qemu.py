#!/usr/bin/env python3
"""QEMU itself under `samepage run`: two guests (TCG, tests/bin/qemu_guest)
opt their RAM in with `-machine mem-merge=on`, as QEMU does for KSM.

The guests fill their RAM with identical, zero and unique pages, rewrite
a few of them on every pass and check every byte of it, pass after pass:
a byte the host lost or mixed up makes a guest print BAD.  From outside,
the test reads the guests' RAM in pagemap through the host addresses
QEMU's monitor gives (gpa2hva)."""
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sptest import (BIN, PAGE, TESTBIN, Env, Fail, Skip, check,  # noqa: E402
                    converge, pfns, run_tests, wait_for)

QEMU = shutil.which("qemu-system-x86_64")
GUEST = os.path.join(TESTBIN, "qemu_guest")
HOT = 61    # qemu_guest.c: guest pages p % HOT == 0 are rewritten each pass


class Guest:
    """One QEMU under samepage run; its serial port on a pipe."""

    def __init__(self, env, mem_mib=256, extra=()):
        self.dir = tempfile.mkdtemp(prefix="spqemu-")
        self.mon = os.path.join(self.dir, "mon.sock")
        argv = [os.path.join(BIN, "samepage"), "run", "--", QEMU,
                "-machine", "pc,mem-merge=on", "-accel", "tcg",
                "-m", f"{mem_mib}M", "-kernel", GUEST,
                "-display", "none", "-nodefaults", "-no-reboot",
                "-serial", "stdio",
                "-monitor", f"unix:{self.mon},server=on,wait=off",
                "-device", "isa-debug-exit,iobase=0xf4,iosize=1", *extra]
        self.errf = tempfile.TemporaryFile(mode="w+")
        self.p = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self.errf, env=dict(os.environ,
                                       SAMEPAGE_SOCKET=env.d.sock))
        self.lines = []
        self.cv = threading.Condition()
        threading.Thread(target=self._reader, daemon=True).start()
        try:
            first, self.n, self.n_ident = (
                int(x) for x in self.wait_line("FILLED", 60).split()[1:])
            self.hva = self.gpa2hva(first * PAGE)
        except BaseException:
            self.p.kill()
            self.p.wait()
            raise

    def _reader(self):
        for raw in self.p.stdout:
            line = raw.decode(errors="replace").strip()
            with self.cv:
                self.lines.append(line)
                self.cv.notify_all()
        with self.cv:
            self.lines.append("EOF")
            self.cv.notify_all()

    def wait_line(self, prefix, timeout=60, after=0):
        """The first line from index `after` on that starts with prefix.
        A BAD line, or QEMU gone, fails the test."""
        end = time.time() + timeout
        with self.cv:
            while True:
                for ln in self.lines[after:]:
                    check(not ln.startswith("BAD"), f"guest: {ln}")
                    if ln.startswith(prefix):
                        return ln
                    check(ln != "EOF", f"QEMU exited: {self.err()}")
                left = end - time.time()
                if left <= 0:
                    raise Fail(f"no '{prefix}' from the guest in {timeout}"
                               f" s; last: {self.lines[-1:]}")
                self.cv.wait(left)

    def passes(self, k, timeout=120):
        """Wait for k complete passes (every byte checked) from now:
        k + 1 PASS lines, as the first may have begun before now."""
        with self.cv:
            at = len(self.lines)
        for _ in range(k + 1):
            self.wait_line("PASS", timeout, at)
            with self.cv:
                at = next(i for i in range(at, len(self.lines))
                          if self.lines[i].startswith("PASS")) + 1

    def send(self, ch):
        self.p.stdin.write(ch.encode())
        self.p.stdin.flush()

    def gpa2hva(self, gpa):
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(10)
        wait_for(lambda: os.path.exists(self.mon), 10)
        s.connect(self.mon)
        out = b""
        while not out.endswith(b"(qemu) "):
            out += s.recv(4096)
        s.sendall(f"gpa2hva {gpa:#x}\n".encode())
        out = b""
        while b"is 0x" not in out or not out.endswith(b"(qemu) "):
            out += s.recv(4096)
        s.close()
        text = out.decode(errors="replace")
        return int(text.split("is 0x")[1].split()[0], 16)

    def pfns(self, first, n):
        return pfns(self.p.pid, self.hva + first * PAGE, n)

    def err(self):
        self.errf.seek(0)
        return self.errf.read()

    def stop(self):
        """'q': the guest stops QEMU; status 1 is isa-debug-exit's 0."""
        if self.p.poll() is None:
            try:
                self.send("q")
            except BrokenPipeError:
                pass
        try:
            rc = self.p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.p.kill()
            rc = self.p.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
        return rc


def need_qemu():
    if not QEMU:
        raise Skip("qemu-system-x86_64 is not installed "
                   "(scripts/deps.sh --test installs qemu-system-x86)")
    if not os.path.exists(GUEST):
        raise Skip("tests/bin/qemu_guest was not built (gcc -m32)")


def stable_shared(a, b):
    """Identical-part pages of a and b on one frame, and how many of that
    part are never rewritten (not hot)."""
    n = min(a.n_ident, b.n_ident)
    fa, fb = a.pfns(0, n), b.pfns(0, n)
    both = sum(1 for x, y in zip(fa, fb) if x is not None and x == y)
    return both, n - (n + HOT - 1) // HOT


def vmas_without(g, flag):
    """Mappings of g's guest RAM (from its first test page on) whose
    VmFlags in smaps lack flag."""
    lo, hi = g.hva, g.hva + g.n * PAGE
    out, cur = [], None
    with open(f"/proc/{g.p.pid}/smaps") as f:
        for line in f:
            w = line.split()
            if w[0] == "VmFlags:":
                if cur and flag not in w[1:]:
                    out.append(cur)
                cur = None
            elif "-" in w[0] and len(w) >= 5 and ":" in w[3]:
                s, e = (int(x, 16) for x in w[0].split("-"))
                cur = w[0] if s < hi and e > lo else None
    return out


def test_two_guests_share_and_stay_intact(extra=()):
    """Two QEMU guests' identical RAM comes to share frames, their zero
    RAM is freed, and each checks every byte through merging, a rewrite
    of those pages in both with equal bytes (they merge again; QEMU's
    MADV_DONTFORK on guest RAM stays), a copy-on-write storm of one of
    them and kill -9 of the daemon."""
    need_qemu()
    with Env(pages_to_scan=20000, sleep_millisecs=5) as e:
        gs = []
        try:
            for _ in range(2):     # one at a time: each is stopped
                gs.append(Guest(e, extra=extra))
            a, b = gs
            want = stable_shared(a, b)[1]
            check(wait_for(lambda: stable_shared(a, b)[0] >= 0.95 * want,
                           120, 0.5),
                  f"{stable_shared(a, b)[0]} of {want} identical pages "
                  "on one frame")
            st = converge(e.d, "ksm_zero_pages",
                          int(0.95 * (a.n // 10 * 2 + b.n // 10 * 2)))
            print(f"  {stable_shared(a, b)[0]} of {a.n_ident} identical "
                  f"pages shared, {st['ksm_zero_pages']} zero pages, "
                  f"{st['general_profit'] >> 20} MiB saved", flush=True)
            for g in gs:
                g.passes(2)
            # both rewrite their identical pages with new bytes, equal
            # across guests: duplicates again, they merge again
            for g in gs:
                with g.cv:
                    at = len(g.lines)
                g.send("r")
                g.wait_line("REWRITTEN", 120, at)
            check(wait_for(lambda: stable_shared(a, b)[0] >= 0.95 * want,
                           120, 0.5),
                  f"{stable_shared(a, b)[0]} of {want} rewritten pages "
                  "merged again")
            # While a twin lives its candidates are MADV_DOFORK for a
            # moment: look once merging is off (and the last batch over)
            e.d.set(run=0)
            for g in gs:
                g.passes(1)
                check(wait_for(lambda: not vmas_without(g, "dc"), 10),
                      f"guest RAM mappings without MADV_DONTFORK (QEMU's): "
                      f"{vmas_without(g, 'dc')[:3]}")
            e.d.set(run=1)
            # copy-on-write storm in a: b's bytes stay, a's land
            with a.cv:
                at = len(a.lines)
            a.send("c")
            a.wait_line("COW", 120, at)
            a.passes(1)
            b.passes(1)
            left = stable_shared(a, b)[0]
            check(left == 0, f"{left} pages still shared after the storm")
            e.d.kill()
            for g in gs:
                g.passes(2)
            for g in gs:
                rc = g.stop()
                check(rc == 1, f"QEMU exit status {rc}: {g.err()[-300:]}")
                check("BAD" not in " ".join(g.lines), "guest saw BAD")
        finally:
            for g in gs:
                g.stop()


def test_guests_with_mem_lock():
    """The same with `-overcommit mem-lock=on`: QEMU locks all its memory
    with mlockall(MCL_CURRENT | MCL_FUTURE) before it allocates guest
    RAM."""
    test_two_guests_share_and_stay_intact(("-overcommit", "mem-lock=on"))


if __name__ == "__main__":
    sys.exit(run_tests([test_two_guests_share_and_stay_intact,
                        test_guests_with_mem_lock]))
