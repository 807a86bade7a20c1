"""The dev stack: the emulated Kubernetes API (kubesim), the Fly simulator (flysim) and the real operator on
loopback, with the repository's CRDs and examples (``kiloclaw-dev``, ``make dev``)."""
