"""``kubectl kiloclaw``: the admin's plugin (console script ``kubectl-kiloclaw``; kubectl finds it on PATH).

Separate from the operator's core: it needs only httpx, PyYAML and pydantic, and reads the kubeconfig with
the loader the operator uses (:mod:`kiloclaw_operator.kubeconfig`).
"""
