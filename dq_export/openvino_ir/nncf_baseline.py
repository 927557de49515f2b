"""``--method nncf``: OpenVINO's own post-training W8A8 of the UNet, as the baseline.

Settings follow optimum-intel's full quantization of a diffusion UNet (``OVQuantizationConfig``
defaults): transformer model type (so SmoothQuant runs on MatMuls with NNCF's default alpha),
mixed preset, fast bias correction, up to 200 calibration calls. The calibration data is the
same cached trajectory inputs our method uses, pooled over all steps: one set of scales.
"""

from __future__ import annotations

from pathlib import Path

NNCF_SETTINGS = {"model_type": "transformer", "preset": "mixed", "subset_size": 200,
                 "fast_bias_correction": True}


def quantize_unet_ir(fp32_xml: Path, out_xml: Path, calls: list[dict]) -> dict:
    """Quantize the FP32 UNet IR with nncf.quantize; return the settings used."""
    import nncf
    import openvino as ov

    model = ov.Core().read_model(fp32_xml)
    subset = min(NNCF_SETTINGS["subset_size"], len(calls))
    quantized = nncf.quantize(model, nncf.Dataset(calls), subset_size=subset,
                              model_type=nncf.ModelType.TRANSFORMER,
                              preset=nncf.QuantizationPreset.MIXED,
                              fast_bias_correction=NNCF_SETTINGS["fast_bias_correction"])
    ov.save_model(quantized, str(out_xml), compress_to_fp16=False)
    return {**NNCF_SETTINGS, "subset_size": subset, "nncf": nncf.__version__}
