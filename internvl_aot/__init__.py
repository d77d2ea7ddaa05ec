"""internvl_aot: an ahead-of-time graph compiler and runtime for InternVL.

The import package is assembled from the repository's top-level folders by a
setuptools package-dir mapping (see pyproject.toml):

    internvl_aot.graphs   <- graphs/    the model as static-shape PyTorch graphs
    internvl_aot.compile  <- compile/   checkpoint -> export -> passes -> artifact
    internvl_aot.runtime  <- runtime/   artifact -> tokens (ships to edge boxes)
"""
__version__ = "0.1.0"
