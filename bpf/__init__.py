"""eBPF programs, their loader and typed map access: empty so far (the datapath is routes and tunnels)."""
