"""benchmarks/sd_quality.py end to end on tiny-sd, offline: a tiny CLIP built from config,
random InceptionV3 weights in torch-fidelity's format, a few reference PNGs.

The numbers mean nothing here (random weights everywhere); the test shows the whole path
runs (generation, FID, CLIP score, PSNR/SSIM, outputs) and that bad input is one line.
"""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the scripts import their shared ``common``
import sd_quality  # noqa: E402

PROMPTS = ["a handwritten digit 7", "a handwritten digit 3", "digit 1", "the number two"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_export):
    """Prompt file, reference images, CLIP folder and InceptionV3 weights, all made here."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, \
        CLIPTokenizer

    root = tmp_path_factory.mktemp("sd-quality-inputs")
    prompts = root / "captions.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")

    references = root / "reference"
    references.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(references / f"real{i}.png")

    tokenizer = CLIPTokenizer.from_pretrained(tiny_export / "tokenizer")
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    layers = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer),
                         max_position_embeddings=tokenizer.model_max_length, **ids, **layers),
        vision_config=dict(image_size=32, patch_size=8, **layers), projection_dim=16)
    torch.manual_seed(0)
    clip = root / "clip"
    CLIPModel(config).save_pretrained(clip)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32},
                                         crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(clip)

    inception = root / "inception.pth"
    torch.save(random_inception(root / "empty.pth").state_dict(), inception)
    return {"prompts": prompts, "references": references, "clip": clip, "inception": inception}


def random_inception(empty: Path):
    """torch-fidelity's InceptionV3 with seeded He-initialised convolutions (activations keep
    their scale through the depth, so the features, and FIDs, are not all ~0)."""
    import torch

    cls = sd_quality.inception_module().FeatureExtractorInceptionV3

    class Unloaded(cls):
        def load_state_dict(self, state_dict, strict=True):  # keep the initialisation
            return None

    torch.save({}, empty)
    torch.manual_seed(0)
    model = Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    return model


def command(inputs, exports, out, *extra):
    return [*exports, "--prompts", str(inputs["prompts"]), "--limit", "3",
            "--reference-images", str(inputs["references"]), "--clip", str(inputs["clip"]),
            "--inception-weights", str(inputs["inception"]), "--steps", "3",
            "--scheduler", "dpm++", "--seed", "5", "--out", str(out), *extra]


def test_quality_of_two_exports_end_to_end(inputs, tiny_export, tiny_w8a8, tmp_path, capsys):
    out = tmp_path / "quality"
    exports = [f"fp32={tiny_export}", f"w8a8={tiny_w8a8}"]
    assert sd_quality.main(command(inputs, exports, out, "--grid-columns", "2")) == 0
    table = capsys.readouterr().out
    assert "| fp32 | fp32 |" in table and "| w8a8 | w8a8 |" in table

    results = json.loads((out / "results.json").read_text())
    assert results["reference"] == "fp32" and results["grid_rows"] == ["fp32", "w8a8"]
    assert results["prompts"] == PROMPTS[:3] and results["settings"]["reference_count"] == 4
    for label in ("fp32", "w8a8"):
        entry = results["exports"][label]
        assert math.isfinite(entry["fid"]) and entry["fid"] >= 0
        assert 0 <= entry["clip_score"] <= 100 and len(entry["per_image"]["clip_score"]) == 3
        assert sorted(p.name for p in (out / label).iterdir()) == \
            ["00000.png", "00001.png", "00002.png"]
    assert results["exports"]["fp32"]["psnr_db"] is None  # the reference itself
    w8a8 = results["exports"]["w8a8"]
    assert 15 < w8a8["psnr_db"] < 100 and 0 < w8a8["ssim"] < 1
    assert len(w8a8["per_image"]["ssim"]) == 3

    # same seeds in every export: image i of w8a8 is close to image i of fp32, not to others
    fp32_images = [np.asarray(Image.open(out / "fp32" / f"{i:05d}.png")) for i in range(3)]
    w8a8_first = np.asarray(Image.open(out / "w8a8" / "00000.png"))
    errors = [np.abs(w8a8_first.astype(int) - image).mean() for image in fp32_images]
    assert np.argmin(errors) == 0

    grid = Image.open(out / "grid.png")
    assert grid.size == (2 * 64, 2 * 64)  # 2 prompts a row, a row per export
    assert np.array_equal(np.asarray(grid)[:64, 64:], fp32_images[1])

    # a rerun keeps the images (same settings in their PNGs) and gives the same numbers
    before = (out / "w8a8" / "00001.png").stat().st_mtime_ns
    assert sd_quality.main(command(inputs, exports, out, "--grid-columns", "2")) == 0
    assert (out / "w8a8" / "00001.png").stat().st_mtime_ns == before
    assert json.loads((out / "results.json").read_text()) == results


def test_fid_of_a_folder_against_itself_is_zero(inputs):
    from dq_export.evaluation.image_metrics import fid

    extractor = sd_quality.load_inception(inputs["inception"])
    files = sd_quality.image_files(inputs["references"])
    features = sd_quality.inception_features(extractor, files, "reference")
    assert features.shape == (4, 2048) and features.std() > 0
    assert abs(fid(features, features)) < 1e-9 * features.var(axis=0).sum()
    assert fid(features[:2], features[2:]) > 0


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("sd_quality: error: ") and "\n" not in err, err
    return err


def test_bad_input_is_one_line(inputs, tiny_export, tmp_path, capsys):
    exports = [f"fp32={tiny_export}"]
    out = tmp_path / "out"

    def fails(argv, *words):
        assert sd_quality.main(argv) == 2
        err = _error(capsys)
        assert all(w in err for w in words), err

    fails(command({**inputs, "prompts": tmp_path / "missing.txt"}, exports, out), "missing.txt")
    empty = tmp_path / "empty"
    empty.mkdir()
    fails(command({**inputs, "references": empty}, exports, out), "holds 0 images")
    fails(command({**inputs, "clip": tmp_path / "no-clip"}, exports, out), "--clip", "no-clip")
    fails(command({**inputs, "inception": tmp_path / "no.pth"}, exports, out), "no such file")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    fails(command({**inputs, "inception": garbage}, exports, out), "not torch-fidelity's")
    fails(command(inputs, [*exports, "fp32=elsewhere"], out), "twice")
    fails(command(inputs, [str(tiny_export)], out), "LABEL=EXPORT_DIR")
    fails(command(inputs, [f"x={tmp_path}"], out), "not a dq-export folder")
    assert not out.exists()  # nothing generated before every input was checked

    # exports of other sizes or models: only the manifests are read before refusing
    for key, value, word in (("image", {"height": 32, "width": 32}, "32x32"),
                             ("model", {"name": "sd14", "init": "random"}, "sd14")):
        other = tmp_path / f"other-{key}"
        other.mkdir()
        manifest = json.loads((tiny_export / "manifest.json").read_text())
        manifest[key] = {**manifest[key], **value}
        (other / "manifest.json").write_text(json.dumps(manifest))
        fails(command(inputs, [*exports, f"other={other}"], out), "differ in", word)
