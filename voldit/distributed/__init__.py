"""The Ray layer: the only package that imports ray. Thin glue around the Ray-free library."""
