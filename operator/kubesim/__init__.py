"""kubesim: an emulated Kubernetes API server for tests, benchmarks and the ``dev`` stack.

Built on aiohttp rather than on kmock 0.8's ``KubernetesEmulator``: the emulator would have needed its
create/update/delete/list/watch handlers, its path parser, its discovery documents and its history keeping
all replaced (see DESIGN 7.1), which left nothing of it in use. A small own server keeps every API-server
rule in one readable place (:mod:`kubesim.store`) and stays fast at thousands of objects.

What it emulates, and how it is configured, is described in :mod:`kubesim.store` and :class:`KubeSim`.
"""

from kubesim.errors import ApiError
from kubesim.server import KubeSim, RequestRecord

__all__ = ["ApiError", "KubeSim", "RequestRecord"]
