"""eBPF programs, their loader and typed map access (issue 6 and later)."""
