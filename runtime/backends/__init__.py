"""Runtime backends besides the AOTInductor graph loader (runtime/graph_loader.py)."""
