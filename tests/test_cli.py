"""The two commands as a user runs them: exit codes and one-line errors, never tracebacks."""

import json
import subprocess
import sys

import pytest
from PIL import Image


def run(module: str, *args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def assert_one_line_error(proc, expected: str):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and expected in errors[0], proc.stderr


def test_help_is_instant_and_lists_models():
    proc = run("dq_export.cli", "--help")
    text = " ".join(proc.stdout.split())
    assert proc.returncode == 0 and "sd14" in text and "sd21-base" in text


@pytest.mark.parametrize("args, expected", [
    (["--model", "sd99"], "unknown model 'sd99'"),
    (["--bits", "int3"], "not supported"),
    (["--bits", "w4a4"], "activations below 8 bits"),
    (["--size", "63"], "multiple of 8"),
    (["--bits", "fp32", "--vae", "int8"], "--vae int8 fits the decoder's activation scales"),
    (["--bits", "w8a8", "--vae", "int4"], "vae 'int4' is not valid"),
    (["--model", "ddpm-cifar10", "--bits", "w8a8", "--vae", "int8"], "has no VAE decoder"),
])
def test_dq_export_bad_input(tmp_path, args, expected):
    assert_one_line_error(run("dq_export.cli", *args, "--out", str(tmp_path / "x")), expected)
    assert not (tmp_path / "x").exists()


def test_dq_export_missing_weights_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dq_export.cli", "--model", "sd14", "--out",
                           str(tmp_path / "x")], capture_output=True, text=True,
                          env={**__import__("os").environ, "HF_HUB_CACHE": str(tmp_path)})
    assert_one_line_error(proc, "CompVis/stable-diffusion-v1-4")


def test_dq_generate_writes_png_and_timings(tiny_export, tmp_path):
    out = tmp_path / "img.png"
    proc = run("deploy.cli", str(tiny_export), "--prompt", "a handwritten digit 3", "--steps", "3",
               "--scheduler", "euler", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert Image.open(out).size == (64, 64)
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["steps"] == 3 and summary["scheduler"] == "euler"
    assert str(out) in proc.stdout


def test_dq_generate_batch_writes_one_png_per_prompt(tiny_export, tmp_path):
    out = tmp_path / "grid.png"
    proc = run("deploy.cli", str(tiny_export), "--prompt", "one", "--prompt", "two", "--steps", "2",
               "--out", str(out), "--no-verify")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "grid-0.png").is_file() and (tmp_path / "grid-1.png").is_file()


def test_dq_generate_bad_input(tiny_export, tmp_path):
    assert_one_line_error(run("deploy.cli", str(tmp_path), "--prompt", "x"), "no manifest.json")
    assert_one_line_error(run("deploy.cli", str(tiny_export), "--prompt", "x", "--steps", "0",
                              "--out", str(tmp_path / "a.png")), "steps")
