"""The core model: cluster rules, identity numbering, key layout and wire types. Imports nothing of ours."""
