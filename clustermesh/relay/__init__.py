"""`clustermesh-relay`: the flows of every node of every connected cluster, merged, as Hubble Relay serves them."""
