"""ResourceStores: Kubernetes-shaped objects in etcd (standalone) or in a Kubernetes API server."""
