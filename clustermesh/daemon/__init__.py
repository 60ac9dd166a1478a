"""What every long-running process of the mesh shares: the health and metrics HTTP endpoints, logging, signals.

Imports nothing of the project's above the core model, so the apiserver and the agent can both use it.
"""
