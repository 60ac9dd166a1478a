"""`clustermesh ui`: a live map of the mesh in the browser, from a relay's flows and the agents' status."""
