"""The onnxruntime path for BACKEND=onnx artifacts (compile/backends/onnx.py).

graphs.py: each `.onnx` opened once as an onnxruntime session, all sessions bound to the same
memory-mapped weights, behind the graph-callable interface the model runners use. It imports
numpy and onnxruntime only (no torch): the engine that drives it is the torch Engine when torch is
installed, or the numpy engine (engine.py) on a box without it.
"""
