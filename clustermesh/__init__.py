"""clustermesh: a multi-cluster network mesh in the spirit of Cilium ClusterMesh."""

__version__ = "0.1.0"
