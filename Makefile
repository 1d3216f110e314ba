# walkie — the two commands that matter: `make demo` and `make test` (see README.md).
CARGO ?= cargo
VENV ?= .venv
# `make install` puts walkie under $(PREFIX) (bin/, share/doc/walkie/) and its user unit in
# ~/.config/systemd/user; no root needed (see tools/install.sh).
PREFIX ?= $(HOME)/.local
# The Raspberry Pi (64-bit OS) target; .cargo/config.toml names the cross linker.
AARCH64 := aarch64-unknown-linux-gnu

.PHONY: all deps deps-test build release test lint fmt demo sdk-venv clean install uninstall \
	aarch64 deb deb-arm64 dist bench bench-deps bench-bins

all: build

# Debian packages the build and tests need (idempotent; root or sudo).
deps:
	@./tools/deps.sh

# Also what the tests need: systemd-analyze, the aarch64 cross toolchain and qemu-user,
# dpkg-dev and cargo-deb (tools/deps.sh says what and why).
deps-test:
	@./tools/deps.sh test

build: deps
	$(CARGO) build --locked --workspace --all-targets

release: deps
	$(CARGO) build --locked --release

# The Python venv with the official OpenAI SDK, used to check the shapes of sent events.
sdk-venv: $(VENV)/.ok
$(VENV)/.ok: tools/sdk-check/requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -r tools/sdk-check/requirements.txt
	touch $@

test: deps-test sdk-venv bench-deps
	WALKIE_SDK_PYTHON=$(CURDIR)/$(VENV)/bin/python $(CARGO) test --locked --workspace --all-targets
	$(MAKE) --no-print-directory bench-bins PROFILE=debug
	./target/debug/rt-bench --quick

# rt-bench (docs/BENCHMARKS.md): walkie and the Python peer side by side, ~10 minutes.
# Results: rt-bench/results/latest.json and SVG plots. BENCH_ARGS="--soak 600" for the
# full hour-equivalent soak.
bench: deps bench-deps
	$(MAKE) --no-print-directory bench-bins PROFILE=release
	./target/release/rt-bench $(BENCH_ARGS)

# What rt-bench runs: walkie with the `probe` feature (kept as walkie-probe), then the
# normal build, the fakes and rt-bench itself (cargo keeps both walkie builds cached).
PROFILE ?= release
PROFILE_FLAG = $(if $(filter release,$(PROFILE)),--release,)
bench-bins:
	$(CARGO) build --locked $(PROFILE_FLAG) -p walkie --features probe --bin walkie
	cp target/$(PROFILE)/walkie target/$(PROFILE)/walkie-probe
	$(CARGO) build --locked $(PROFILE_FLAG) -p walkie -p walkie-fakes -p rt-bench --bins

# rt-bench's own setup: PulseAudio and the ALSA pulse plugin, the Python peer's venv.
bench-deps:
	@./rt-bench/setup.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

install: release
	BIN=target/release/walkie PREFIX="$(PREFIX)" ./tools/install.sh install

uninstall:
	PREFIX="$(PREFIX)" ./tools/install.sh uninstall

# An aarch64 binary for a Raspberry Pi 3/4/5 or Zero 2 W with a 64-bit OS:
# target/aarch64-unknown-linux-gnu/release/walkie
aarch64:
	@./tools/deps.sh cross
	$(CARGO) build --locked --release -p walkie --target $(AARCH64)

# The files the Debian packages carry beside the binary (unit with /usr/bin, examples).
dist:
	./tools/dist.sh target/dist

# Debian packages: target/debian/walkie_*_amd64.deb and (deb-arm64) walkie_*_arm64.deb.
deb: release dist
	@./tools/deps.sh deb
	$(CARGO) deb --locked -p walkie --no-build

deb-arm64: aarch64 dist
	@./tools/deps.sh deb
	$(CARGO) deb --locked -p walkie --no-build --target $(AARCH64)

# The main job on the built-in local stand-ins: no keys, no hardware.
demo: deps
	$(CARGO) build --locked -p walkie -p walkie-fakes --bins
	./tools/demo.sh

clean:
	$(CARGO) clean
	rm -rf $(VENV) .venv-bench
