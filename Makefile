# samepage - one plain GNU Makefile.
#   make                          build bin/, lib/
#   make test                     unit + integration tests (tests/run)
#   make SANITIZE=address,undefined test
#   make SANITIZE=thread test
#   make bench                    benchmark against kernel KSM (bench/run)
#   make fuzz                     libFuzzer target over the protocol decoder
#   make lint                     mandoc -Tlint on the man pages

CC      ?= cc
CFLAGS  ?= -O2 -g
WARN    := -Wall -Wextra -Wshadow -Wstrict-prototypes -Wmissing-prototypes \
           -Wpointer-arith -Wcast-qual -Wundef -Wwrite-strings
ifeq ($(CI),true)
WARN    += -Werror
endif
CPPFLAGS += -D_GNU_SOURCE -Iinclude -Isrc
ALL_CFLAGS = $(CFLAGS) $(WARN) -std=gnu11 -pthread
LDLIBS  := -pthread

PLAIN_CFLAGS := $(ALL_CFLAGS)
PLAIN_LDFLAGS := $(LDFLAGS)
comma := ,
ifneq ($(SANITIZE),)
ALL_CFLAGS += -fsanitize=$(SANITIZE) -fno-omit-frame-pointer
LDFLAGS    += -fsanitize=$(SANITIZE)
BUILD      := build/$(subst $(comma),-,$(SANITIZE))
else
BUILD      := build/plain
endif
# TSan cannot run inside a preloaded library that interposes mmap (it
# faults in its own shadow before it is set up), so under SANITIZE=thread
# the preload is built plain; libsamepage.so, the daemon, the command and
# the test programs are still instrumented.  ASan/UBSan instrument all.
ifneq ($(findstring thread,$(SANITIZE)),)
PRE_CFLAGS  := $(PLAIN_CFLAGS)
PRE_LDFLAGS := $(PLAIN_LDFLAGS)
PRE_DIR     := $(BUILD)/pre
else
PRE_CFLAGS  := $(ALL_CFLAGS)
PRE_LDFLAGS := $(LDFLAGS)
PRE_DIR     := $(BUILD)/lib
endif

LIB_SRC    := proto.c log.c util.c region.c uffd.c merge.c agent.c interpose.c fds.c
DAEMON_SRC := samepaged.c scan.c client.c pool.c index.c proto.c log.c util.c
CLI_SRC    := samepage.c estimate.c proto.c log.c util.c

LIB_OBJ    := $(LIB_SRC:%.c=$(BUILD)/lib/%.o)
PRE_OBJ    := $(LIB_SRC:%.c=$(PRE_DIR)/%.o) $(PRE_DIR)/preload.o
DAEMON_OBJ := $(DAEMON_SRC:%.c=$(BUILD)/bin/%.o)
CLI_OBJ    := $(CLI_SRC:%.c=$(BUILD)/bin/%.o)

BINS := bin/samepage bin/samepaged lib/libsamepage.so lib/libsamepage_preload.so

all: $(BINS) tests-build

$(BUILD)/lib/%.o: src/%.c src/*.h include/samepage.h | $(BUILD)/lib
	$(CC) $(CPPFLAGS) -DSP_LIBRARY $(ALL_CFLAGS) -fPIC -fvisibility=hidden -c -o $@ $<
ifneq ($(PRE_DIR),$(BUILD)/lib)
$(PRE_DIR)/%.o: src/%.c src/*.h include/samepage.h | $(PRE_DIR)
	$(CC) $(CPPFLAGS) -DSP_LIBRARY $(PRE_CFLAGS) -fPIC -fvisibility=hidden -c -o $@ $<
$(PRE_DIR):
	mkdir -p $@
endif
$(BUILD)/bin/%.o: src/%.c src/*.h include/samepage.h | $(BUILD)/bin
	$(CC) $(CPPFLAGS) $(ALL_CFLAGS) -c -o $@ $<
$(BUILD)/lib $(BUILD)/bin bin lib:
	mkdir -p $@

# The outputs record which build made them, so switching SANITIZE rebuilds.
STAMP := $(BUILD)/.stamp
$(STAMP): | $(BUILD)/lib
	rm -f build/*/.stamp; touch $@

lib/libsamepage.so: $(LIB_OBJ) $(STAMP) | lib
	$(CC) -shared $(LDFLAGS) -Wl,-soname,libsamepage.so -o $@ $(LIB_OBJ) $(LDLIBS)
lib/libsamepage_preload.so: $(PRE_OBJ) $(STAMP) | lib
	$(CC) -shared $(PRE_LDFLAGS) -o $@ $(PRE_OBJ) $(LDLIBS)
bin/samepaged: $(DAEMON_OBJ) $(STAMP) | bin
	$(CC) $(LDFLAGS) -o $@ $(DAEMON_OBJ) -lxxhash $(LDLIBS)
bin/samepage: $(CLI_OBJ) $(STAMP) | bin
	$(CC) $(LDFLAGS) -o $@ $(CLI_OBJ) -lxxhash $(LDLIBS)

include tests/tests.mk

test: all
	tests/run

bench: all
	bench/run

lint:
	mandoc -Tlint -W warning man/*.[0-9]

FUZZ_SRC := tests/fuzz/fuzz_decode.c src/proto.c
fuzz: bin/fuzz_decode
	bin/fuzz_decode -max_total_time=30 -max_len=65536
bin/fuzz_decode: $(FUZZ_SRC) src/sp_proto.h | bin
	clang $(CPPFLAGS) -g -O1 -fsanitize=fuzzer,address,undefined -o $@ $(FUZZ_SRC)

format:
	clang-format -i src/*.c src/*.h include/*.h tests/*/*.c bench/*.c

clean:
	rm -rf build bin lib tests/bin

.PHONY: all test bench lint fuzz format clean tests-build
