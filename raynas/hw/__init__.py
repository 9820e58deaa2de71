"""Hardware: devices, ONNX export, onnxruntime measurement, latency models."""
