"""The hub's read-only HTTP face: the fleet page, `/api/...` JSON and `/metrics`."""
