"""ONNX -> OpenVINO IR, keeping the precision the recipe asked for."""

from __future__ import annotations

from pathlib import Path


INT8_WEIGHTS = "int8 weight-only: asymmetric, per output channel (nncf.compress_weights)"


def convert_to_ir(onnx_path: Path, xml_path: Path, compress_to_fp16: bool,
                  int8_weights: bool = False) -> Path:
    """Convert one ONNX graph to ``xml_path`` (+ ``.bin``).

    ``ov.save_model`` compresses weights to FP16 unless told otherwise, which would silently
    change an FP32 export, so the choice is explicit here. ``int8_weights`` stores every
    MatMul and embedding weight as int8 (INT8_WEIGHTS); activations stay float.
    """
    import openvino as ov

    model = ov.convert_model(str(onnx_path))
    if int8_weights:
        import nncf

        model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(xml_path), compress_to_fp16=compress_to_fp16)
    return xml_path
