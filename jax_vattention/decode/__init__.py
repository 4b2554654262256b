"""Running a model over the cache: the step batch, sampling, jitted generation (one device or a
mesh) and the mesh helpers."""
