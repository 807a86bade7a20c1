"""kubesim: an emulated Kubernetes API server for tests, benchmarks and the ``dev`` stack.

Why not kmock: it is built on aiohttp directly rather than on kmock 0.8's ``KubernetesEmulator``. Wrapping
the emulator would have meant replacing its create/update/delete/list/watch handlers, its path parser, its
discovery documents and its history keeping (DESIGN 7.1), leaving nothing of it in use. One small server keeps
every API-server rule in one readable module (:mod:`kubesim.store`) and stays fast at thousands of objects.

Use from Python::

    sim = KubeSim()
    sim.start_in_thread()                       # or: await sim.start() in the caller's loop
    sim.load_crds([Path("crds")])
    sim.create_namespace("tenants")
    sim.write_kubeconfig(Path(".dev/kubeconfig"), namespace="tenants")
    sim.get_object("kiloclaw.kilo.ai", "v1alpha1", "kiloclawinstances", "tenants", "bob")
    sim.stop_thread()

or standalone: ``python -m kubesim --port 6443 --crds crds/ --kubeconfig .dev/kubeconfig``.

kopf (1.45) against it: log in with ``@kopf.on.login`` returning
``kopf.ConnectionInfo(server=sim.url, insecure=True, token="kubesim")`` (the ``kubernetes`` client reads
``KUBECONFIG`` at import time, so do not rely on it), run ``kopf.operator(standalone=True, ...)`` (there is no
peering resource), and set ``settings.watching.server_timeout`` to a few seconds so that watch streams cycle.
Everything else (finalizers via JSON patch, the status subresource, Events, ``initial_streaming``) works with
kopf's defaults. CRD schemas prune unknown fields as a real API server does: kopf's progress storage in
``status.kopf`` needs ``x-kubernetes-preserve-unknown-fields`` on ``status`` (or annotations-only storage).

kubectl (1.32) against it: ``get`` (with printer columns), ``get -w``, ``apply -f`` (validation on, no
``--validate=false`` needed; ``--dry-run=server`` works), ``patch --type merge|json``, ``patch
--subresource=status``, ``delete``, ``wait``, ``describe``, ``explain``, ``api-resources`` and
``create namespace``. Caveats: only namespaces, events and CRDs/custom resources are served (no
ConfigMaps, Deployments, RBAC...); server-side apply (``apply --server-side``) is refused (415);
``kubectl apply -f crds/`` trips over ``kustomization.yaml`` exactly as against a real cluster (use ``-k``
or name the files); use a fresh ``--cache-dir`` when a new server reuses a port, since kubectl caches
discovery per host:port.

As strict as kube-apiserver v1.34 where the two meet (tests/simulators/test_parity.py runs the same
assertions against both): structural-schema checks on CRDs (:mod:`kubesim.structural`), object-metadata
validation (:mod:`kubesim.metavalidation`), Go RE2 for ``pattern`` (:mod:`kubesim.re2`), kube-openapi's
``date-time``, 415 for strategic-merge patches on custom resources, Go-type decoding errors (400), Warning
headers for unknown and duplicate fields, and the real servers' error shapes (field causes, bracketed lists).

Not modelled: authentication/authorization (any token is accepted), admission webhooks, ownerReference
garbage collection, server-side apply and managedFields, protobuf except for creating namespaces, the
``events.k8s.io`` group, and multi-version conversion (all served versions share one stored object).
"""

from kubesim.errors import ApiError
from kubesim.server import KubeSim, RequestRecord

__all__ = ["ApiError", "KubeSim", "RequestRecord"]
