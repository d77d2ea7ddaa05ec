"""Compile backends besides the default torch.export + AOTInductor path (compile/pipeline.py)."""
