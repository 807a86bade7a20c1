# Every target creates the virtualenv it needs when it is missing.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
N      ?= 1000
PYTEST_WORKERS ?= 2
RUNS   ?= 200
SEED   ?=
CHAOS_JOBS ?= 1

.PHONY: venv dev run test stories lint bench bench-outage bench-cluster chaos e2e cluster cluster-down clean image

# Both distributions, editable: the operator (the wheel and the image carry only it) and kiloclaw-dev
# (operator/kiloclaw-dev/: the simulators flysim and kubesim, and the dev stack).
$(STAMP): pyproject.toml operator/kiloclaw-dev/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]' -e operator/kiloclaw-dev
	touch $(STAMP)

venv: $(STAMP)

## make dev: embedded Kubernetes API + Fly simulator + the operator, with a sample instance (kiloclaw-dev)
dev: $(STAMP)
	$(BIN)/kiloclaw-dev

## make run: the operator against the current kube context and the real Fly API (FLY_API_TOKEN required)
run: $(STAMP)
	$(BIN)/kiloclaw-operator run

## make test: unit, simulator and end-to-end tests (parallel workers), without the slow stories
test: $(STAMP)
	$(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadgroup -q -m "not slow"

## make stories: the slow stories (pytest -m slow: the operator and the dev stack in OS processes, two
## replicas, chaos, real deadlines) on kubesim and flysim; make e2e runs them first, so CI does
stories: $(STAMP)
	$(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadgroup -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check operator tests
	$(BIN)/ruff format --check operator tests
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python tests/tools/benchmark.py --instances $(N)

## make chaos: RUNS seeded fault-injection runs (default 200) of two replicas against flysim and kubesim;
## a campaign writes its table into RELIABILITY.md, SEED=<seed> RUNS=1 replays one run (printed only)
chaos: $(STAMP)
	nice $(BIN)/python tests/tools/chaos.py --runs $(RUNS) --jobs $(CHAOS_JOBS) $(if $(SEED),--seed $(SEED),--write RELIABILITY.md)

## make bench-outage: the Fly that really exists at N instances (migration, lying feed, region outage)
bench-outage: $(STAMP)
	$(BIN)/python tests/tools/bench_outage.py --instances $(N)

## make bench-cluster: the same benchmark against the real API server of `make cluster` (start it fresh)
bench-cluster: $(STAMP)
	KUBECONFIG=$(CURDIR)/.cluster/kubeconfig $(BIN)/python tests/tools/benchmark.py --cluster --instances $(N)

## make image: the operator image from the Dockerfile with podman, tagged $(IMAGE); LOCAL_BASE=1 builds it on
## a locally made Debian bookworm + python3 base instead of the pinned public one (no registry needed);
## BASE=<image> builds on another base
IMAGE ?= localhost/kiloclaw-operator:dev
image:
	IMAGE=$(IMAGE) tests/image/image.sh $(if $(LOCAL_BASE),--local-base)

## make cluster: a real kube-apiserver + etcd on loopback, built once from Go modules (cached in ~/.cache)
## NODES=1 adds kube-controller-manager, kube-scheduler and two kubelets on containerd (tests/node/node.sh;
## root, containerd, runc and the CNI plugins needed), so that deploy/ runs as Pods
cluster:
	tests/controlplane/cluster.sh up
	$(if $(NODES),tests/node/node.sh up)

cluster-down:
	tests/node/node.sh down
	tests/controlplane/cluster.sh down

# make e2e uses the cluster of `make cluster` when it runs, otherwise the current kube context.
E2E_KUBECONFIG ?= $(if $(wildcard .cluster/kubeconfig),$(CURDIR)/.cluster/kubeconfig,$(KUBECONFIG))

## make e2e: the slow stories (make stories), then the end-to-end suite against a real API server (skipped,
## saying why, when none answers)
# After the stories, every CRD rule, the API semantics kubesim emulates (parity) and the install itself on the server
# (no operator running), then the stories with the operator authenticated as its ServiceAccount.
e2e: $(STAMP) stories
	KUBECONFIG=$(E2E_KUBECONFIG) $(BIN)/pytest -q -rs --cluster -n 0 tests/unit/test_crds.py tests/simulators/test_parity.py tests/e2e/test_install.py tests/e2e/test_chart_e2e.py tests/e2e/test_kube_auth.py
	KUBECONFIG=$(E2E_KUBECONFIG) $(BIN)/pytest -q -rs --cluster -n 0 tests/e2e/test_lifecycle_e2e.py tests/e2e/test_recovery_e2e.py tests/e2e/test_retained_e2e.py tests/e2e/test_kubectl_plugin.py tests/e2e/test_tenancy_e2e.py tests/e2e/test_tenancy_cluster.py tests/e2e/test_fly_reality_e2e.py
	# The image (built on a local base, cached by its inputs; skipped, saying why, without podman): its
	# contents, then the operator in its container against the same server, in a process of its own so that
	# no in-process operator of the suites above holds the Lease.
	set -e; image=""; if command -v podman >/dev/null; then image="$$(tests/image/image.sh --local-base)"; fi; \
	  KILOCLAW_IMAGE="$$image" KUBECONFIG=$(E2E_KUBECONFIG) $(BIN)/pytest -q -rs --cluster -n 0 tests/e2e/test_image.py tests/e2e/test_image_e2e.py
	# `kubectl apply -k deploy/` on the nodes of `make cluster NODES=1` (skipped, saying why, without them).
	set -e; image=""; if command -v podman >/dev/null; then image="$$(tests/image/image.sh --local-base)"; fi; \
	  KILOCLAW_IMAGE="$$image" KUBECONFIG=$(E2E_KUBECONFIG) $(BIN)/pytest -q -rs --cluster -n 0 tests/e2e/test_node_e2e.py

clean:
	rm -rf $(VENV) .dev .pytest_cache .mypy_cache .ruff_cache
