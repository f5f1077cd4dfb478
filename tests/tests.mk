# tests.mk - test programs.  Unit tests use cmocka; integration programs
# are plain C run by tests/run against real processes.
UNIT     := test_proto test_region test_index test_scan
INTEG    := memfill
tests-build: $(UNIT:%=tests/bin/%) $(INTEG:%=tests/bin/%)

tests/bin:
	mkdir -p $@
tests/bin/test_proto: tests/unit/test_proto.c src/proto.c src/sp_proto.h $(STAMP) | tests/bin
	$(CC) $(CPPFLAGS) $(ALL_CFLAGS) $(LDFLAGS) -o $@ tests/unit/test_proto.c src/proto.c -lcmocka
tests/bin/test_region: tests/unit/test_region.c src/region.c src/sp.h $(STAMP) | tests/bin
	$(CC) $(CPPFLAGS) $(ALL_CFLAGS) $(LDFLAGS) -o $@ tests/unit/test_region.c src/region.c -lcmocka
tests/bin/test_index: tests/unit/test_index.c src/index.c src/pool.c src/log.c src/util.c src/proto.c src/sp.h $(STAMP) | tests/bin
	$(CC) $(CPPFLAGS) $(ALL_CFLAGS) $(LDFLAGS) -o $@ tests/unit/test_index.c src/index.c src/pool.c src/log.c src/util.c src/proto.c -lcmocka -lxxhash $(LDLIBS)
tests/bin/test_scan: tests/unit/test_scan.c src/scan.c src/client.c src/index.c src/pool.c src/log.c src/util.c src/proto.c src/uffd.c src/sp.h $(STAMP) | tests/bin
	$(CC) $(CPPFLAGS) $(ALL_CFLAGS) $(LDFLAGS) -o $@ tests/unit/test_scan.c src/scan.c src/client.c src/index.c src/pool.c src/log.c src/util.c src/proto.c src/uffd.c -lcmocka -lxxhash $(LDLIBS)
tests/bin/%: tests/integration/%.c $(STAMP) | tests/bin
	$(CC) $(CPPFLAGS) $(ALL_CFLAGS) $(LDFLAGS) -o $@ $< -luring $(LDLIBS)
# Built static on purpose, without the sanitizers (which cannot link
# statically): samepage run must say it cannot preload into it.
tests-build: tests/bin/static_prog
tests/bin/static_prog: tests/integration/static_prog.c | tests/bin
	$(CC) -O2 -static -o $@ $<
# The benchmark's programs are built with the rest: the workloads
# (bench/run) and the per-step timing of a single-page merge.
tests-build: tests/bin/workload tests/bin/steps
tests/bin/workload tests/bin/steps: tests/bin/%: bench/%.c $(STAMP) | tests/bin
	$(CC) $(CPPFLAGS) $(ALL_CFLAGS) $(LDFLAGS) -o $@ $< $(LDLIBS)
# The QEMU test's guest: a bare multiboot kernel, 32-bit, freestanding,
# so without the sanitizers.  Left out (and the test skips) where gcc
# cannot build 32-bit code.
tests-build: tests/bin/qemu_guest
tests/bin/qemu_guest: tests/integration/qemu_guest.c tests/integration/qemu_guest.ld | tests/bin
	@if $(CC) -m32 -ffreestanding -fno-pic -fno-stack-protector \
	    -fno-asynchronous-unwind-tables -O2 -Wall -Wextra \
	    -c -o $@.o $< 2>$@.err && \
	  ld -m elf_i386 --no-warn-rwx-segments -T tests/integration/qemu_guest.ld \
	    -o $@ $@.o 2>>$@.err; then rm -f $@.o $@.err; \
	else echo "note: tests/bin/qemu_guest not built (see $@.err); the QEMU test will skip"; \
	  rm -f $@.o; fi
