# walkie — the two commands that matter: `make demo` and `make test` (see README.md).
CARGO ?= cargo
VENV ?= .venv

.PHONY: all deps build release test lint fmt demo sdk-venv clean

all: build

# Debian packages the build and tests need (idempotent; root or sudo).
deps:
	@./tools/deps.sh

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

test: deps sdk-venv
	WALKIE_SDK_PYTHON=$(CURDIR)/$(VENV)/bin/python $(CARGO) test --locked --workspace --all-targets

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

# The main job on the built-in local stand-ins: no keys, no hardware.
demo: deps
	$(CARGO) build --locked -p walkie -p walkie-fakes --bins
	./tools/demo.sh

clean:
	$(CARGO) clean
	rm -rf $(VENV)
