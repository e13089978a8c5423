"""Quantization stages: static INT8 (ONNX Runtime QDQ), dynamic INT8 (ONNX Runtime, PyTorch), bfloat16.

`static` and `dynamic` register the stages; `qdq` holds the ONNX Runtime building blocks,
`emulate` the PyTorch fake-quantization used to rank layers, `search` the mixed-precision search.
"""
