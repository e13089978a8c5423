"""Exporters: PyTorch graphs to ONNX (validated against PyTorch), ONNX to TensorRT engines."""
