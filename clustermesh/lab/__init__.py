"""The lab: multi-cluster meshes out of network namespaces on one Linux host (DESIGN section 7)."""
