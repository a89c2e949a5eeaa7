"""What runs a backbone over batches of images: torch, ONNX Runtime, OpenVINO."""
