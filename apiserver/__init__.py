"""clustermesh-apiserver: one per cluster, the single writer of the cluster's `cilium/` keys ."""
