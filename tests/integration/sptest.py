"""sptest.py - helpers for samepage's integration tests.

Each test runs real processes (tests/bin/memfill under bin/samepage run)
against a private daemon on its own socket, and checks the kernel's own
truth: physical frame numbers in /proc/PID/pagemap, /proc/meminfo, and
the bytes of every page.
"""
import json
import os
import signal
import struct
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.join(ROOT, "bin")
LIB = os.path.join(ROOT, "lib")
TESTBIN = os.path.join(ROOT, "tests", "bin")
MEMFILL = os.path.join(TESTBIN, "memfill")
PAGE = 4096


class Skip(Exception):
    """The test needs something this machine lacks."""


class Fail(Exception):
    pass


def check(cond, what):
    if not cond:
        raise Fail(what)


def pagemap(pid, addr, n):
    """List of (present, file, exclusive, pfn) for n pages at addr."""
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        f.seek((addr // PAGE) * 8)
        raw = f.read(8 * n)
    out = []
    for (v,) in struct.iter_unpack("<Q", raw):
        out.append((v >> 63 & 1, v >> 61 & 1, v >> 56 & 1, v & ((1 << 55) - 1)))
    return out


def pfns(pid, addr, n):
    return [e[3] if e[0] else None for e in pagemap(pid, addr, n)]


def meminfo():
    d = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":")
            d[k] = int(v.split()[0])  # kB
    return d


def pool_vmas(pid):
    """Pool mappings in a client, less its read-only view of the pool."""
    with open(f"/proc/{pid}/maps") as f:
        return sum(1 for line in f if "samepage-pool" in line) - 1


def map_count(pid):
    with open(f"/proc/{pid}/maps") as f:
        return sum(1 for _ in f)


class Daemon:
    """A samepaged of our own, in the foreground, on a private socket."""

    def __init__(self, **knobs):
        self.dir = tempfile.mkdtemp(prefix="sptest-")
        self.sock = os.path.join(self.dir, "samepaged.sock")
        knobs.setdefault("pages_to_scan", 20000)
        knobs.setdefault("sleep_millisecs", 5)
        args = [os.path.join(BIN, "samepaged"), "-f", "-s", self.sock]
        for k, v in knobs.items():
            args += ["-o", f"{k}={v}"]
        self.log = open(os.path.join(self.dir, "daemon.log"), "w+")
        self.proc = subprocess.Popen(args, stderr=self.log)
        for _ in range(200):
            if os.path.exists(self.sock):
                break
            time.sleep(0.01)
        else:
            raise Fail("daemon did not start")
        os.environ["SAMEPAGE_SOCKET"] = self.sock

    def cli(self, *args, check_rc=True):
        r = subprocess.run([os.path.join(BIN, "samepage"), *args],
                           capture_output=True, text=True,
                           env=dict(os.environ, SAMEPAGE_SOCKET=self.sock))
        if check_rc and r.returncode != 0:
            raise Fail(f"samepage {' '.join(args)}: {r.stderr.strip()}")
        return r

    def status(self):
        return json.loads(self.cli("status", "--json").stdout)

    def set(self, **knobs):
        self.cli("set", *[f"{k}={v}" for k, v in knobs.items()])

    def kill(self, sig=signal.SIGKILL):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait()

    def stop(self):
        self.kill(signal.SIGTERM)
        self.log.close()


class Proc:
    """tests/bin/memfill under `samepage run`, driven over a pipe."""

    def __init__(self, daemon=None, run_args=(), env=None, direct=False,
                 prog=None):
        e = dict(os.environ, **(env or {}))
        if daemon:
            e["SAMEPAGE_SOCKET"] = daemon.sock
        prog = prog or [MEMFILL]
        argv = prog if direct else \
            [os.path.join(BIN, "samepage"), "run", *run_args, "--", *prog]
        # stderr goes to a file: a pipe nobody drains would block the
        # agent's log lines, and with them merging.
        self.errf = tempfile.TemporaryFile(mode="w+")
        self.p = subprocess.Popen(argv, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE,
                                  stderr=self.errf, text=True, env=e)
        self.pid = self.p.pid
        self.addr = None
        self.npages = 0

    def cmd(self, line, timeout=120):
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()
        out = self.p.stdout.readline().strip()
        if not out:
            self.p.wait(timeout=5)
            raise Fail(f"memfill died on '{line}': {self.err().strip()}")
        return out

    def ok(self, line):
        out = self.cmd(line)
        check(out.startswith("ok"), f"'{line}' -> {out}")
        return out[3:]

    def map(self, n, shared=False):
        self.addr = int(self.ok(f"{'mapshared' if shared else 'map'} {n}"), 16)
        self.npages = n
        return self.addr

    def stats(self):
        return dict(kv.split("=") for kv in self.ok("stats").split())

    def pfns(self, first=0, n=None):
        return pfns(self.pid, self.addr + first * PAGE,
                    self.npages - first if n is None else n)

    def pagemap(self, first=0, n=None):
        return pagemap(self.pid, self.addr + first * PAGE,
                       self.npages - first if n is None else n)

    def quit(self):
        try:
            self.p.stdin.write("quit\n")
            self.p.stdin.flush()
        except BrokenPipeError:
            pass
        rc = self.p.wait(timeout=30)
        self.stderr = self.err()
        return rc

    def err(self):
        """What the program wrote to stderr so far."""
        self.errf.seek(0)
        return self.errf.read()


def sanitizer_build():
    """'tsan', 'asan' or '' for the build of the test programs."""
    r = subprocess.run(["ldd", MEMFILL], capture_output=True, text=True)
    return "tsan" if "libtsan" in r.stdout else \
        "asan" if "libasan" in r.stdout else ""


def sanitizer_reports(text):
    """Lines where ASan, UBSan or TSan reported something."""
    keys = ("ERROR: AddressSanitizer", "runtime error:",
            "WARNING: ThreadSanitizer", "ERROR: LeakSanitizer")
    return [ln for ln in text.splitlines() if any(k in ln for k in keys)]


class Env:
    """A daemon and the processes of one test, all gone at the end."""

    def __init__(self, **knobs):
        self.d = Daemon(**knobs)
        self.procs = []

    def proc(self, **kw):
        p = Proc(self.d, **kw)
        self.procs.append(p)
        return p

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        reports = []
        for p in self.procs:
            if p.p.poll() is None:
                p.p.kill()
            p.p.wait()
            reports += sanitizer_reports(p.err())
            for f in (p.p.stdin, p.p.stdout, p.errf):
                try:
                    f.close()
                except OSError:
                    pass
        self.d.kill()
        self.d.log.close()
        reports += sanitizer_reports(self.daemon_log())
        subprocess.run(["rm", "-rf", self.d.dir], check=False)
        if reports and exc[0] is None:
            raise Fail("sanitizer: " + reports[0])
        return False

    def daemon_log(self):
        with open(os.path.join(self.d.dir, "daemon.log")) as f:
            return f.read()


def twins(env, n, seed=1, fault=None, **kw):
    """Two processes with n identical pages, opted in; the first with
    SAMEPAGE_FAULT=fault, if given."""
    ps = [env.proc(**kw, **({"env": {"SAMEPAGE_FAULT": fault}}
                            if fault and not i else {}))
          for i in range(2)]
    for p in ps:
        p.map(n)
        p.ok(f"fill {seed} 0 {n}")
        p.ok("merge")
    return ps


def shared(a, b, first=0, n=None):
    """How many pages a and b hold on one physical frame."""
    return sum(1 for x, y in zip(a.pfns(first, n), b.pfns(first, n))
               if x is not None and x == y)


def converge(d, key, want, timeout=60):
    """Wait until status[key] >= want; return the status."""
    st = wait_for(lambda: (lambda s: s if s[key] >= want else None)(
        d.status()), timeout=timeout, step=0.1)
    check(st and st[key] >= want,
          f"{key} reached {d.status()[key]}, wanted {want}")
    return st


def all_merged(d, n, timeout=60):
    """Wait until n pages map pool pages (pages_shared, the pool pages
    in use, plus pages_sharing, the pages saved); return the status."""
    st = wait_for(lambda: (lambda s: s if s["pages_shared"] +
                           s["pages_sharing"] >= n else None)(d.status()),
                  timeout=timeout, step=0.1)
    s = d.status()
    check(st, f"{s['pages_shared']} + {s['pages_sharing']} pages merged, "
          f"wanted {n}")
    return st


def wait_for(cond, timeout=30, step=0.05):
    end = time.time() + timeout
    while time.time() < end:
        v = cond()
        if v:
            return v
        time.sleep(step)
    return cond()


def require_uffd_move():
    """Skip unless /dev/userfaultfd works and the kernel has UFFDIO_MOVE."""
    if not os.path.exists("/dev/userfaultfd"):
        raise Skip("no /dev/userfaultfd")
    if not os.access("/dev/userfaultfd", os.R_OK | os.W_OK):
        raise Skip("/dev/userfaultfd not accessible")
    rel = os.uname().release.split(".")
    if (int(rel[0]), int(rel[1].split("-")[0])) < (6, 8):
        raise Skip("kernel older than 6.8: no UFFDIO_MOVE")
    if os.geteuid() != 0:
        raise Skip("pagemap frame numbers need root")


def run_tests(tests):
    """Run test functions; print one line each and the summary."""
    only = sys.argv[1:]
    passed = failed = skipped = 0
    # every test the module defines is in its list (one left out never ran)
    main = vars(sys.modules["__main__"])
    left_out = sorted(n for n, f in main.items()
                      if n.startswith("test_") and callable(f) and
                      getattr(f, "__module__", None) == "__main__" and
                      f not in tests)
    for name in left_out:
        print(f"FAIL {name}: defined but not in the module's run_tests list",
              flush=True)
        failed += 1
    for t in tests:
        name = t.__name__
        if only and name not in only:
            continue
        t0 = time.time()
        try:
            require_uffd_move()
            t()
            print(f"PASS {name} ({time.time() - t0:.1f}s)", flush=True)
            passed += 1
        except Skip as e:
            print(f"SKIP {name}: {e}", flush=True)
            skipped += 1
        except Exception as e:  # noqa: BLE001 - report any failure
            print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
            failed += 1
    print(f"{passed} passed, {failed} failed, {skipped} skipped", flush=True)
    return 1 if failed else 0
