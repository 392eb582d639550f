"""The ONNX Runtime / QNN toolkit: converted model files, providers, population packs."""
