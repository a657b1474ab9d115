# The two README commands. Each sets itself up on a fresh machine: Debian packages for headless
# rendering, a .venv with everything pinned (torch 2.14.1 / torchvision 0.29.1), the package.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXTRAS := learning,metaworld,ros,franka,dev
FRANKA_SIM := .venv-franka-sim
FRANKA_STAMP := $(FRANKA_SIM)/.installed
DEB_PACKAGES := libegl1 libegl-mesa0 libgl1 libgl1-mesa-dri libgles2 libosmesa6
TEST_DEB_PACKAGES := chromium chromium-driver  # the web console's browser test (Selenium, headless)
export MUJOCO_GL ?= egl
PYTEST_ARGS ?=

.PHONY: demo test setup deb lint bench clean franka-sim

demo: setup
	$(VENV)/bin/robot-rl demo

test: setup $(FRANKA_STAMP)
	@$(MAKE) --no-print-directory deb DEB_PACKAGES="$(TEST_DEB_PACKAGES)"
	$(PY) -m pytest -q --durations=20 $(PYTEST_ARGS)

setup: deb $(STAMP)

deb:
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  sudo=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq $$missing >/dev/null; \
	fi

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	@touch $(STAMP)

# franka-sim (a simulated Franka speaking the real FCI protocol) pins numpy 1.26 and mujoco < 3.3: own venv.
# It reads the Panda MJCF shipped in gym-hil (FR3_MJCF, set by the tests).
franka-sim: $(FRANKA_STAMP)

$(FRANKA_STAMP):
	@test -x $(FRANKA_SIM)/bin/python || $(PYTHON) -m venv $(FRANKA_SIM) || python3 -m venv $(FRANKA_SIM)
	$(FRANKA_SIM)/bin/python -m pip install -q franka-sim
	$(FRANKA_SIM)/bin/python -m pip install -q --no-deps gym-hil
	@touch $(FRANKA_STAMP)

lint: setup
	$(VENV)/bin/ruff check robot_rl sim drivers policies tests benchmarks

bench: setup
	$(PY) benchmarks/sim_throughput.py
	$(PY) benchmarks/make_results.py

clean:
	rm -rf $(VENV) $(FRANKA_SIM) outputs reports .pytest_cache
