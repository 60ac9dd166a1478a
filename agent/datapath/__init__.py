"""The node's datapath: pod interfaces (for the CNI plugin) and routing between nodes, programmed from the view.

The only place of the agent that uses pyroute2 or runs `wg` and `wireguard-go`.
"""
