"""``kubectl kiloclaw``: the admin's plugin (console script ``kubectl-kiloclaw``; kubectl finds it on PATH).

Separate from the operator's core: it needs only httpx, pydantic and the official ``kubernetes`` client's
configuration loading, through the login the operator uses (:mod:`kiloclaw_operator.kubeconfig`), and the
reasons the operator writes (:mod:`kiloclaw_operator.reasons`).
"""
