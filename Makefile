# Two commands for a fresh machine:  `make run` (the main job)  and  `make test`.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run compare test lint format bench clean

$(VENV)/.ready-run: pyproject.toml scripts/setup-venv.sh
	./scripts/setup-venv.sh
	touch $@

$(VENV)/.ready-dev: pyproject.toml scripts/setup-venv.sh
	./scripts/setup-venv.sh dev
	touch $@ $(VENV)/.ready-run

run: $(VENV)/.ready-run
	$(VENV)/bin/attnkit compare --quick --out attnkit-report

compare: $(VENV)/.ready-run
	$(VENV)/bin/attnkit compare --out attnkit-report

# The C++ kernels' tests once more, built for AVX2 (x86-64-v3; GCC 11 or newer): on an
# AVX-512 host, the code an AVX2 host runs (other vector widths and tile sizes). An AVX2
# host's own build is that code already, so only AVX-512 hosts rerun.
KERNEL_TESTS := $(addprefix tests/ops/test_,cpu_decode.py decode_block.py skinny_linear.py \
	int8_decode.py latent_decode.py banded_backend.py cpp_decode_backend.py cpp_build.py \
	rms_norm.py attention_invariants.py) \
	$(addprefix tests/cache/test_,contiguous.py quantized.py) \
	tests/models/test_stacked_decode.py tests/models/test_smollm2_parity.py

test: $(VENV)/.ready-dev lint
	$(PY) -m pytest -q
	@if [ "$$(uname -m)" = x86_64 ] && grep -qw avx512f /proc/cpuinfo 2>/dev/null; then \
		echo "== the kernel tests again, built for AVX2 (ATTNKIT_CPU_ARCH=x86-64-v3)"; \
		ATTNKIT_CPU_ARCH=x86-64-v3 $(PY) -m pytest -q $(KERNEL_TESTS); \
	else \
		echo "== no AVX2 rerun of the kernel tests: not an x86-64 host with AVX-512"; \
	fi

lint: $(VENV)/.ready-dev
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(VENV)/.ready-dev
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

bench: $(VENV)/.ready-dev
	$(PY) benchmarks/attention.py

clean:
	rm -rf attnkit-report $(VENV) build *.egg-info src/*.egg-info .pytest_cache .ruff_cache
