"""The OpenVINO stage: ONNX -> IR, NNCF's baseline, GenAI's layout, the CPU's ISA and timings."""
