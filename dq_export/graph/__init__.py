"""The ONNX stage: the components traced to ONNX, and the passes that quantize the UNet graph."""
