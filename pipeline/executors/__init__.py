"""Where map stages run: in the driver process (local) or on a Ray cluster (ray, the only module that imports ray)."""
