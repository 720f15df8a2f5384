# projhost - build, test, run.  `make help` lists the targets.

DEBS      := luajit libluajit-5.1-dev libpq-dev libuv1-dev lua-busted lua-cjson \
             postgresql pkg-config gcc make util-linux luarocks lua-filesystem \
             lua-check cppcheck libmicrohttpd-dev prometheus chromium curl
PKGS      := luajit libpq libuv libmicrohttpd
CC        ?= cc
OPT       ?= -O2
PKG_CFLAGS = $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
PKG_LIBS   = $(shell pkg-config --libs libpq libuv libmicrohttpd 2>/dev/null)
LUA_LIBS   = $(shell pkg-config --libs luajit 2>/dev/null)
CFLAGS    += -std=c11 -D_GNU_SOURCE $(OPT) -g -Wall -Wextra -Werror -fPIC -Icore $(PKG_CFLAGS) \
             -DPH_LUADIR='"$(PREFIX)/share/projhost/lua"'
PREFIX    ?= /usr/local
BUILD     ?= build
BIN       ?= projhost

# The same sources make the binary and the Lua module projhost.core: the C
# subsystems in core/ (no Lua in them), the Lua bindings in core/bindings/
# (the only place that includes lua.h; main.c is the binary's entry).
LIB_SRCS  := core/log.c core/beat.c core/pg.c core/stmt.c core/frame.c core/proto.c core/queue.c core/pipeline.c core/registry.c core/schedule.c core/proc.c \
             core/wakecheck.c core/http.c core/metrics.c core/surface.c core/subscribe.c core/master.c \
             core/bindings/lua_core.c core/bindings/lua_pg.c core/bindings/lua_master.c core/bindings/lua_worker.c \
             core/bindings/lua_proc.c
HDRS      := $(wildcard core/*.h core/bindings/*.h spec/core/*.h)
LIB_OBJS  := $(LIB_SRCS:core/%.c=$(BUILD)/obj/%.o)

.PHONY: all deps build asan test test-asan run bench clean help lint install

all: build

help:
	@echo "make deps   install the Debian packages projhost needs (apt-get)"
	@echo "make        build ./projhost and $(BUILD)/lib/projhost/core.so"
	@echo "make run    start the embedded PostgreSQL, seed demo events, serve projections/"
	@echo "make test   run the whole busted suite (unit + integration on a throwaway cluster)"
	@echo "make asan   build with address+undefined sanitizers and run the suite"
	@echo "make bench  benchmarks (not part of test)"
	@echo "make install [PREFIX=/usr/local] [DESTDIR=]  the binary in PREFIX/bin, its Lua library in PREFIX/share/projhost/lua"
	@echo "make lint   luarocks lint, luacheck and cppcheck (also run by make test)"

# Install only what is missing; dpkg-query is quick when all is there.
deps:
	@missing=""; for p in $(DEBS); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null || exit 1; \
	fi

build: $(BIN) $(BUILD)/lib/projhost/core.so $(BUILD)/queue_test $(BUILD)/proto_test $(BUILD)/schedule_test $(BUILD)/registry_test \
       $(BUILD)/pipeline_test

$(BUILD)/obj/%.o: core/%.c $(HDRS) | deps
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c $< -o $@

$(BIN): $(BUILD)/obj/bindings/main.o $(LIB_OBJS)
	$(CC) $(CFLAGS) $(LDFLAGS) -rdynamic -o $@ $^ $(PKG_LIBS) $(LUA_LIBS) -lm -ldl

$(BUILD)/lib/projhost/core.so: $(LIB_OBJS)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(LDFLAGS) -shared -o $@ $^ $(PKG_LIBS)

# C checks of the queue and framing, run by spec/core/queue_spec.lua
$(BUILD)/queue_test: spec/core/queue_test.c $(BUILD)/obj/queue.o $(BUILD)/obj/frame.o $(HDRS)
	$(CC) $(CFLAGS) $(LDFLAGS) -o $@ $< $(BUILD)/obj/queue.o $(BUILD)/obj/frame.o

# C checks of the master's scheduling rules, run by spec/core/schedule_spec.lua
$(BUILD)/schedule_test: spec/core/schedule_test.c $(BUILD)/obj/schedule.o $(HDRS)
	$(CC) $(CFLAGS) $(LDFLAGS) -o $@ $< $(BUILD)/obj/schedule.o

# C checks of the projection registry, run by spec/core/schedule_spec.lua
$(BUILD)/registry_test: spec/core/registry_test.c $(BUILD)/obj/registry.o $(BUILD)/obj/proto.o $(BUILD)/obj/log.o $(HDRS)
	$(CC) $(CFLAGS) $(LDFLAGS) -o $@ $< $(BUILD)/obj/registry.o $(BUILD)/obj/proto.o $(BUILD)/obj/log.o -lm

# C checks of the pipeline's record (tags, routing), run by spec/core/pipeline_spec.lua;
# it answers for libpq's sending calls itself, so no server is needed
$(BUILD)/pipeline_test: spec/core/pipeline_test.c $(BUILD)/obj/pipeline.o $(BUILD)/obj/stmt.o $(BUILD)/obj/pg.o $(HDRS)
	$(CC) $(CFLAGS) $(LDFLAGS) -o $@ $< $(BUILD)/obj/pipeline.o $(BUILD)/obj/stmt.o $(BUILD)/obj/pg.o $(PKG_LIBS)

# C checks of the master/worker messages, run by spec/core/proto_spec.lua
$(BUILD)/proto_test: spec/core/proto_test.c $(BUILD)/obj/proto.o $(HDRS)
	$(CC) $(CFLAGS) $(LDFLAGS) -o $@ $< $(BUILD)/obj/proto.o

asan:
	$(MAKE) BUILD=build-asan BIN=build-asan/projhost \
		OPT="-O1 -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined" \
		LDFLAGS="-fsanitize=address,undefined" build
	@echo "built build-asan/projhost with address+undefined sanitizers; running the suite"
	PROJHOST_BIN=$(CURDIR)/build-asan/projhost PROJHOST_LUADIR=$(CURDIR)/lua \
		ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 build-asan/projhost test

test: build
	./projhost test

# make run serves HTTP here (RUN_HTTP=127.0.0.1:9000 make run to move it)
RUN_HTTP  ?= 127.0.0.1:8187
run: build
	./projhost run --demo --http $(RUN_HTTP) projections

# Not part of test: a throwaway cluster, ~1M-event data sets, one table
# (and bench/results.json) of projhost next to the plain-libpq limit.
bench: build bench/limit
	luajit bench/bench.lua

bench/limit: bench/limit.c | deps
	$(CC) -std=c11 -D_GNU_SOURCE $(OPT) -g -Wall -Wextra -Werror $(shell pkg-config --cflags libpq) \
		-o $@ $< $(shell pkg-config --libs libpq)

# Dead code and slips: run by spec/unit/structure_spec.lua, so `make test` fails on them.
lint: | deps
	luarocks lint projhost-scm-1.rockspec
	luacheck --quiet --std luajit lua/
	cppcheck --quiet --error-exitcode=1 --enable=style,unusedFunction --inline-suppr \
		--suppress=missingIncludeSystem $(shell pkg-config --cflags libpq) core/

# The binary finds its library relative to itself (core/bindings/main.c), so the
# installed tree works from any PREFIX and after being moved.
LUA_FILES = $(shell cd lua && find projhost -name '*.lua' | sort)
install: build
	install -d $(DESTDIR)$(PREFIX)/bin
	install -m 755 $(BIN) $(DESTDIR)$(PREFIX)/bin/projhost
	for f in $(LUA_FILES); do \
		install -D -m 644 lua/$$f $(DESTDIR)$(PREFIX)/share/projhost/lua/$$f || exit 1; \
	done

clean:
	rm -rf build build-asan projhost
