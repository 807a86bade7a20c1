"""KiloClaw operator: Kubernetes control plane for KiloClaw sandboxes running as Fly.io Machines."""

__version__ = "0.1.0"
