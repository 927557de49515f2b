import json

import onnx
import pytest

from dq_export.errors import UserError
from dq_export.export import export
from dq_export.manifest import read_manifest, sha256
from dq_export.recipe import Recipe


def test_manifest_describes_the_export(tiny_export):
    manifest = read_manifest(tiny_export)
    assert manifest["schema_version"] == 2
    assert manifest["model"] == {"kind": "registry", "name": "tiny-sd", "hub_id": None,
                                 "init": "random", "seed": 0}
    assert manifest["recipe"]["bits"] == "fp32"
    assert manifest["image"] == {"height": 64, "width": 64, "vae_scale_factor": 4,
                                 "latent_channels": 4, "latent_scaling": 0.18215}
    assert manifest["scheduler"]["_class_name"] == "PNDMScheduler"
    assert {"torch", "onnx", "openvino"} <= set(manifest["versions"])
    for name in ("text_encoder", "unet", "vae_decoder"):
        paths = manifest["components"][name]
        for rel in (paths["onnx"], paths["openvino"], paths.get("weights",
                                                               paths["openvino"][:-4] + ".bin")):
            entry = manifest["files"][rel]
            assert entry["bytes"] == (tiny_export / rel).stat().st_size > 0
            assert entry["sha256"] == sha256(tiny_export / rel)


def test_onnx_graphs_pass_the_checker_with_the_documented_interface(tiny_export):
    expected = {"text_encoder": ["input_ids"], "vae_decoder": ["latent_sample"],
                "unet": ["sample", "timestep", "encoder_hidden_states"]}
    for name, inputs in expected.items():
        path = tiny_export / "onnx" / f"{name}.onnx"
        onnx.checker.check_model(str(path))
        model = onnx.load(str(path))
        assert [i.name for i in model.graph.input] == inputs
        assert model.opset_import[0].version >= 17


def test_openvino_ir_keeps_fp32_weights(tiny_export):
    import openvino as ov

    model = ov.Core().read_model(tiny_export / "unet" / "openvino_model.xml")
    constants = [op for op in model.get_ops() if op.get_type_name() == "Constant"]
    assert not any(c.get_element_type() == ov.Type.f16 for c in constants)


def test_non_empty_out_is_refused_without_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(UserError, match="--force"):
        export("tiny-sd", out, Recipe(), init="random")
    assert (out / "keep.txt").read_text() == "user data"


def test_failed_export_leaves_nothing_that_looks_valid(tmp_path, monkeypatch):
    import dq_export.openvino_ir.openvino_convert as conv

    def broken(*args, **kwargs):
        raise RuntimeError("conversion failed")

    monkeypatch.setattr(conv, "convert_to_ir", broken)
    with pytest.raises(RuntimeError):
        export("tiny-sd", tmp_path / "out", Recipe(), init="random")
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_is_a_one_line_error_and_leaves_nothing(tmp_path, monkeypatch):
    """OpenVINO reports a full disk as a bare iostream error: the export asks the disk, says
    how much it had written, and removes it."""
    import shutil
    from collections import namedtuple

    import dq_export.openvino_ir.openvino_convert as conv

    def disk_full(*args, **kwargs):
        raise RuntimeError("basic_ios::clear: iostream error")

    usage, real_disk_usage = namedtuple("usage", "total used free"), shutil.disk_usage
    monkeypatch.setattr(conv, "convert_to_ir", disk_full)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1, 1, 0))
    with pytest.raises(UserError, match=r"filled up after \d+\.\d GB .* larger disk"):
        export("tiny-sd", tmp_path / "out", Recipe(), init="random")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(shutil, "disk_usage", real_disk_usage)
    with pytest.raises(RuntimeError, match="iostream"):  # with room left it is not the disk
        export("tiny-sd", tmp_path / "out", Recipe(), init="random")


def test_force_replaces_an_old_export(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    export("tiny-sd", out, Recipe(bits="fp16"), init="random", force=True)
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "manifest.json").read_text())["recipe"]["bits"] == "fp16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


