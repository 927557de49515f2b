import json

import pytest

from dq_export.errors import UserError
from dq_export.layout import read_layout
from dq_export.loading import load_components
from dq_export.registry import REGISTRY, get_spec


def test_every_entry_has_configs_and_a_hub_id():
    for spec in REGISTRY.values():
        layout = read_layout(spec.config_dir)
        assert not layout.missing(), spec.name
        for sub in layout.weight_folders:
            assert (spec.config_dir / sub / "config.json").is_file(), (spec.name, sub)
        assert layout.scheduler_file.is_file(), spec.name
        assert layout.image_size() == spec.image_size, spec.name
        assert spec.embedded or spec.hub_ids
    assert get_spec("sd14").hub_ids[0] == "CompVis/stable-diffusion-v1-4"
    assert read_layout(get_spec("ddpm-cifar10").config_dir).unet == ""  # the hub's flat layout
    assert read_layout(get_spec("ldm-celebahq-256").config_dir).decoder == "vqvae"


@pytest.mark.parametrize("model, part, cls, expected", [
    ("sd14", "unet", "UNet2DConditionModel", 859_520_964),
    ("ddpm-cifar10", "", "UNet2DModel", 35_746_307),  # the DDPM paper's 35.7 M
    ("ldm-celebahq-256", "unet", "UNet2DModel", 274_056_163),  # the LDM paper's 274 M
    ("ldm-celebahq-256", "vqvae", "VQModel", 55_322_782),
])
def test_configs_are_the_published_architectures(model, part, cls, expected):
    import diffusers
    import torch

    model_cls = getattr(diffusers, cls)
    config = model_cls.load_config(get_spec(model).config_dir / part)
    with torch.device("meta"):
        module = model_cls.from_config(config)
    assert sum(p.numel() for p in module.parameters()) == expected


def test_unknown_model_lists_known_names():
    with pytest.raises(UserError, match="tiny-sd, sd14, sd15, sd21-base, sd21"):
        load_components("sd99")


def test_missing_weights_names_hub_id_layout_and_random_init(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache
    with pytest.raises(UserError) as err:
        load_components("sd14")
    message = str(err.value)
    for expected in ("CompVis/stable-diffusion-v1-4", "unet/", "--init random"):
        assert expected in message


def test_hf_cache_snapshot_is_found_offline(tmp_path, monkeypatch):
    """A diffusers folder in the HF cache layout is loaded for its registry name."""
    spec = get_spec("sd14")
    repo = tmp_path / ("models--" + spec.hub_ids[0].replace("/", "--"))
    snapshot = repo / "snapshots" / "abc123"
    tiny = load_components("tiny-sd", "random", seed=3)
    for name, module in (("unet", tiny.unet), ("text_encoder", tiny.text_encoder),
                         ("vae", tiny.vae)):
        module.save_pretrained(snapshot / name)
    tiny.tokenizer.save_pretrained(snapshot / "tokenizer")
    (snapshot / "scheduler").mkdir()
    (snapshot / "scheduler" / "scheduler_config.json").write_text(json.dumps(tiny.scheduler_config))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    loaded = load_components("sd14")
    assert loaded.source["init"] == "pretrained"
    assert loaded.unet.config.block_out_channels == tiny.unet.config.block_out_channels


def test_local_folder_round_trip(tmp_path):
    """Weights saved by diffusers/transformers load back bit-exactly from a local folder."""
    import torch

    tiny = load_components("tiny-sd", "random", seed=1)
    for name in ("unet", "text_encoder", "vae"):
        getattr(tiny, name).save_pretrained(tmp_path / name)
    tiny.tokenizer.save_pretrained(tmp_path / "tokenizer")
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(tiny.scheduler_config))
    loaded = load_components(str(tmp_path))
    assert loaded.source["kind"] == "folder" and loaded.source["init"] == "pretrained"
    for a, b in zip(tiny.unet.state_dict().values(), loaded.unet.state_dict().values()):
        assert torch.equal(a, b)
    assert loaded.image_size == 64


def test_local_folder_without_weights_is_explained(tmp_path):
    for sub in ("unet", "text_encoder", "vae", "tokenizer", "scheduler"):
        (tmp_path / sub).mkdir()
    with pytest.raises(UserError, match="no weights.*--init random"):
        load_components(str(tmp_path))
    (tmp_path / "vae").rmdir()
    with pytest.raises(UserError, match="missing vae/"):
        load_components(str(tmp_path))


def test_random_init_is_seeded():
    import torch

    a, b, c = (load_components("tiny-sd", "random", seed=s).unet for s in (5, 5, 6))
    first = next(iter(a.state_dict()))
    assert torch.equal(a.state_dict()[first], b.state_dict()[first])
    assert not torch.equal(a.state_dict()[first], c.state_dict()[first])
