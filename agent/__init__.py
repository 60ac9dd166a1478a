"""clustermesh-agent: one per node, reads every cluster's etcd and programs the datapath."""
