"""ONNX -> OpenVINO IR, keeping the precision the recipe asked for."""

from __future__ import annotations

from pathlib import Path


def convert_to_ir(onnx_path: Path, xml_path: Path, compress_to_fp16: bool) -> Path:
    """Convert one ONNX graph to ``xml_path`` (+ ``.bin``).

    ``ov.save_model`` compresses weights to FP16 unless told otherwise, which would silently
    change an FP32 export, so the choice is explicit here.
    """
    import openvino as ov

    model = ov.convert_model(str(onnx_path))
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(xml_path), compress_to_fp16=compress_to_fp16)
    return xml_path
