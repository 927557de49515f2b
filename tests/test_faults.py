"""Faults and hostile input, injected: an export killed, raced, starved of disk; corrupt
caches and exports; impossible output paths. Each ends in a one-line error (exit 2) that
names the file or path, or in a clean resume; nothing half-written is left where a reader
looks, and nothing wrong is loaded. The server's faults are in test_server_faults.py.

Subprocesses only where a process must die; the rest calls the commands' ``main`` in this
process (the same code path, without a Python start-up each time). docs/reliability.md has
the table of faults and what the user sees.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from calibration.collect import CalibrationSettings, collect
from calibration.statistics import StepStatistics
from dq_export.errors import UserError
from dq_export.loading import load_components
from dq_export.manifest import read_manifest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
# the smallest W8A8 export that has every stage: calibration (one batch per prompt, two
# UNet calls each), fit, ONNX, QDQ graphs, IR; an FP32 text encoder skips NNCF's weight
# compression (seconds)
W8A8 = ["--model", "tiny-sd", "--init", "random", "--bits", "w8a8", "--calib-batch", "1",
        "--calib-scheduler", "ddim", "--calib-steps", "2", "--groups", "2",
        "--text-encoder-weights", "fp32", "--no-genai"]
STAGE_DONE = re.compile(r"^\[(\d+)/(\d+)\] .+: [\d.]+ s$")


def one_line_error(code: int, stderr: str, *expected: str) -> str:
    """Exit 2 and a single error line holding every ``expected`` text; that line."""
    assert code == 2 and "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, stderr
    assert all(text in errors[0] for text in expected), errors[0]
    return errors[0]


def main(module: str, capsys, *args) -> tuple[int, str]:
    """A command's ``main`` in this process: (exit code, stderr). A traceback would be an
    exception here, and fail the test."""
    capsys.readouterr()
    code = __import__(module, fromlist=["main"]).main([str(a) for a in args])
    return code, capsys.readouterr().err


@pytest.fixture
def start_export():
    """Starts ``dq-export W8A8 --calib-prompts N`` as a process with its output on a pipe or
    in a file; any still running at the end of the test is killed."""
    processes = []

    def start(out: Path, cache: Path, prompts: int, output=subprocess.PIPE) -> subprocess.Popen:
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "dq_export.cli", *W8A8, "--calib-prompts", str(prompts),
             "--calibration-dir", str(cache), "--out", str(out)],
            stdout=output, stderr=subprocess.STDOUT, text=True))
        return processes[-1]

    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


def nothing_at(out: Path) -> None:
    """What a reader of ``out`` must find while an export to it runs or after it was killed:
    no folder, so no half an export; only dq-export's hidden lock and partial folders."""
    assert not out.exists()
    with pytest.raises(UserError, match="not a dq-export folder"):
        read_manifest(out)
    assert all(p.name == f".{out.name}.lock" or p.name.startswith(f".{out.name}.partial-")
               for p in out.parent.iterdir()), list(out.parent.iterdir())


def test_killed_export_leaves_nothing_and_the_next_run_resumes_cleanly(start_export, tmp_path,
                                                                         capsys):
    """SIGKILL during calibration (after its first checkpoint); then the next run, frozen
    (SIGSTOP) after every numbered stage to look at what a kill there would leave, while
    another export to the same --out is refused."""
    out, cache = tmp_path / "exports" / "tiny", tmp_path / "calibration"
    with open(tmp_path / "killed.log", "w") as log:
        killed = start_export(out, cache, prompts=2, output=log)
    deadline = time.monotonic() + 300
    while not (cache / "stats.safetensors").is_file():  # batch 1 of 2 checkpointed
        assert killed.poll() is None and time.monotonic() < deadline, \
            (tmp_path / "killed.log").read_text()
        time.sleep(0.02)
    killed.kill()
    killed.wait()
    assert StepStatistics.load(cache / "stats.safetensors")[1]["batches_done"] == "1"
    nothing_at(out)
    assert [p.name for p in out.parent.glob(".tiny.partial-*")] == [f".tiny.partial-{killed.pid}"]
    first_batch = (cache / "inputs" / "batch-0000.safetensors").stat().st_mtime_ns

    run = start_export(out, cache, prompts=2)
    done, output, stages = [], [], 0
    for line in run.stdout:
        output.append(line)
        stage = STAGE_DONE.match(line.rstrip("\n").split("\r")[-1])
        if not stage:
            continue
        run.send_signal(signal.SIGSTOP)
        try:
            done.append(int(stage[1]))
            stages = int(stage[2])
            if done[-1] < stages:
                nothing_at(out)  # the last stage may already be renamed into place
            if done[-1] == 1:  # a second export (this process) to the same --out, meanwhile
                code, err = main("dq_export.cli", capsys, *W8A8, "--out", out, "--force")
                one_line_error(code, err, f"another dq-export (pid {run.pid}) is writing {out}")
        finally:
            run.send_signal(signal.SIGCONT)
    assert run.wait(timeout=300) == 0, "".join(output)
    assert stages == 12 and done == list(range(1, stages + 1))
    assert f"removed .tiny.partial-{killed.pid}: left by an export to {out} that was killed" \
        in "".join(output)
    read_manifest(out)  # every file there, every hash right
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny"]
    # the calibration resumed from the killed run's checkpoint: batch 0 was not redone
    assert (cache / "inputs" / "batch-0000.safetensors").stat().st_mtime_ns == first_batch
    assert len(list((cache / "inputs").glob("batch-*.safetensors"))) == 2


def test_what_killed_exports_left_is_removed_and_reported(tmp_path, caplog):
    """Partial folders, and the old export a killed --force run had moved aside to replace;
    nothing else of the parent folder."""
    from dq_export.staging import remove_leftovers

    names = [".tiny.partial-11", ".tiny.partial-12", ".tiny.old-13", ".tinier.partial-14",
             "tiny", "tiny.partial-15"]
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "file").write_text("x")
    remove_leftovers(tmp_path / "tiny")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tinier.partial-14", "tiny",
                                                          "tiny.partial-15"]
    assert "removed .tiny.partial-11, .tiny.partial-12, .tiny.old-13: left by an export to " \
        f"{tmp_path / 'tiny'} that was killed" in caplog.text


def test_a_second_export_to_the_same_out_is_refused_and_the_lock_goes_with_the_first(
        tmp_path):
    from dq_export.lock import exclusive

    def busy(holder):
        raise UserError(f"held by {holder}")

    lock = tmp_path / ".out.lock"
    with exclusive(lock, busy):
        with pytest.raises(UserError, match=r"held by \d+"):
            with exclusive(lock, busy):
                pass
    assert not lock.exists()
    with exclusive(lock, busy):
        assert lock.read_text().strip().isdigit()


def test_a_second_export_waits_for_the_calibration_cache_being_filled(tmp_path):
    """Two exports of one recipe to two folders share a cache: the second waits, then reads
    what the first wrote, instead of both writing its checkpoint at once."""
    import threading

    from dq_export.lock import exclusive

    lock, events = tmp_path / ".lock", []

    def second():
        with exclusive(lock, lambda holder: events.append(f"waiting for {holder}")):
            events.append("filling")

    with exclusive(lock, lambda holder: None):
        thread = threading.Thread(target=second)
        thread.start()
        deadline = time.monotonic() + 30
        while not events and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        assert events == [f"waiting for {os.getpid()}"]
    thread.join(timeout=30)
    assert events[1:] == ["filling"] and not lock.exists()


CALIBRATED = [*W8A8, "--calib-prompts", "1"]


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


@pytest.fixture(scope="module")
def calibration_cache(tmp_path_factory):
    """The complete calibration cache of CALIBRATED, left by a dq-export interrupted (^C)
    right after its calibration stage; which wrote no export."""
    import dq_export.graph.quantize_unet
    from dq_export import cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    root = tmp_path_factory.mktemp("calibrated")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dq_export.graph.quantize_unet, "fit_params", interrupted)
        code = cli.main([*CALIBRATED, "--calibration-dir", str(root / "cache"),
                         "--out", str(root / "export")])
    assert code == 130 and sorted(p.name for p in root.iterdir()) == ["cache"]
    return root / "cache"


@pytest.mark.parametrize("name", ["stats.safetensors", "meta.json"])
def test_a_truncated_calibration_cache_is_a_one_line_error_naming_the_file(
        name, calibration_cache, tmp_path, capsys):
    cache = tmp_path / "cache"
    shutil.copytree(calibration_cache, cache)
    truncate(cache / name)
    code, err = main("dq_export.cli", capsys, *CALIBRATED, "--calibration-dir", cache,
                     "--out", tmp_path / "export")
    one_line_error(code, err, f"calibration cache file {cache / name} is truncated or corrupt",
                   f"delete {cache}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # no export, partial, lock


def test_a_truncated_batch_of_cached_inputs_is_named_where_it_is_read(calibration_cache,
                                                                       tmp_path):
    """The UNet inputs, read by --method nncf, --cache and --budget exports."""
    from calibration.collect import load_inputs, load_trajectories

    cache = tmp_path / "cache"
    shutil.copytree(calibration_cache, cache)
    batch = cache / "inputs" / "batch-0000.safetensors"
    truncate(batch)
    for load in (load_inputs, load_trajectories):
        with pytest.raises(UserError, match=f"{re.escape(str(batch))} is truncated or corrupt"):
            load(cache)


def test_a_full_disk_during_calibration_keeps_the_cache_whole_and_the_next_run_resumes(
        tmp_path, monkeypatch, capsys):
    import safetensors.numpy

    tiny = load_components("tiny-sd", "random", seed=0)
    settings = CalibrationSettings(scheduler="ddim", steps=2, num_prompts=2, batch_size=1)
    real, writes = safetensors.numpy.save_file, []

    def fills_the_disk(tensors, filename, metadata=None):
        writes.append(filename)
        if len(writes) > 2:  # from batch 1's inputs on, after batch 0's and its checkpoint
            Path(filename).write_bytes(b"\0" * 4096)  # as much as the disk took
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.numpy, "save_file", fills_the_disk)
    cache = tmp_path / "cache"
    with pytest.raises(UserError) as error:
        collect(tiny, settings, ["1", "2"], 64, cache, progress=False)
    assert re.fullmatch(rf"the disk holding {re.escape(str(cache))} filled up after \d+\.\d GB "
                        r"of the calibration cache were written: free space or pass "
                        r"--calibration-dir on a larger disk \(the batches done are kept: the "
                        r"next run resumes from them\)", str(error.value))
    assert not list(cache.rglob("*.tmp")) and not (cache / ".lock").exists()
    assert StepStatistics.load(cache / "stats.safetensors")[1]["batches_done"] == "1"
    # the command line says it in one line too, as it does for a full disk during export
    code, err = main("dq_export.cli", capsys, *CALIBRATED, "--calibration-dir",
                     tmp_path / "cli-cache", "--out", tmp_path / "export")
    one_line_error(code, err, "filled up after", "--calibration-dir on a larger disk")
    assert not (tmp_path / "export").exists() and not list(tmp_path.glob(".export*"))
    monkeypatch.setattr(safetensors.numpy, "save_file", real)
    resumed, _ = collect(tiny, settings, ["1", "2"], 64, cache, progress=False)
    assert StepStatistics.load(cache / "stats.safetensors")[1]["batches_done"] == "2"
    # each of the 2 prompts counted once: (cond + uncond) x 4x16x16 latents per step
    assert resumed.steps_seen().all()
    assert resumed.histogram("conv_in", [0]).total == 2 * 2 * 4 * 16 * 16


def edit_manifest(change):
    def edit(root: Path) -> None:
        manifest = json.loads((root / "manifest.json").read_text())
        change(manifest)
        (root / "manifest.json").write_text(json.dumps(manifest))
    return edit


def edit_graph(root: Path) -> None:
    xml = root / "vae_decoder" / "openvino_model.xml"
    xml.write_text(xml.read_text().replace('version="opset1"', 'version="opset999"', 1))


CORRUPT_EXPORTS = {  # fault: (what is done to the export, dq-generate flags, error texts)
    "a listed file missing": (lambda root: (root / "unet" / "openvino_model.bin").unlink(), [],
                              ["unet/openvino_model.bin is missing from the export"]),
    "an unlisted file added": (
        lambda root: (root / "tokenizer" / "added_tokens.json").write_text('{"7": 9}'), [],
        ["tokenizer/added_tokens.json is not in the export's manifest"]),
    "a manifest entry for no file": (edit_manifest(lambda m: m["files"].update(
        {"onnx/extra.onnx": {"bytes": 1, "sha256": "0" * 64}})), [],
        ["onnx/extra.onnx is missing from the export"]),
    "an older schema version": (edit_manifest(lambda m: m.update(schema_version=1)), [],
                                ["manifest.json has schema version 1, older", "re-export"]),
    "a newer schema version": (edit_manifest(lambda m: m.update(schema_version=3)), [],
                               ["manifest.json has schema version 3, newer", "upgrade"]),
    "a truncated manifest": (lambda root: truncate(root / "manifest.json"), [],
                             ["manifest.json is not valid JSON"]),
    "a manifest without components": (edit_manifest(lambda m: m.pop("components")), [],
                                      ["manifest.json lacks components"]),
    "the tokenizer folder missing": (lambda root: shutil.rmtree(root / "tokenizer"), [],
                                     ["tokenizer/", "is missing from the export"]),
    "the tokenizer folder missing, unverified": (
        lambda root: shutil.rmtree(root / "tokenizer"), ["--no-verify"],
        ["tokenizer is missing from the export"]),
    "an IR graph edited by hand": (edit_graph, [], [
        "vae_decoder/openvino_model.xml does not match its manifest hash"]),
    "an IR graph edited by hand, unverified": (edit_graph, ["--no-verify"], [
        "vae_decoder/openvino_model.xml could not be loaded by OpenVINO", "opset999"]),
}


@pytest.mark.parametrize("fault", CORRUPT_EXPORTS)
def test_a_corrupt_export_is_a_one_line_error_naming_the_file(fault, tiny_export, tmp_path,
                                                              capsys):
    corrupt, flags, expected = CORRUPT_EXPORTS[fault]
    export = tmp_path / "export"
    shutil.copytree(tiny_export, export)
    corrupt(export)
    code, err = main("deploy.cli", capsys, export, "--prompt", "x", "--steps", "1",
                     "--out", tmp_path / "x.png", *flags)
    one_line_error(code, err, *expected)
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("kind", ["missing under /proc", "under a file", "name too long"])
def test_impossible_output_paths_are_one_line_errors_before_any_work(kind, tiny_export,
                                                                     tmp_path, capsys,
                                                                     monkeypatch):
    (tmp_path / "file").write_text("")
    bad = {"missing under /proc": Path("/proc/dq-test"), "under a file": tmp_path / "file",
           "name too long": tmp_path / ("x" * 300)}[kind]
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    for module, args in [
            ("dq_export.cli", ["--init", "random", "--out", bad / "export"]),
            ("dq_export.cli", [*CALIBRATED, "--calibration-dir", bad / "cache",
                               "--out", tmp_path / "export"]),
            ("deploy.cli", [tiny_export, "--prompt", "x", "--out", bad / "x.png"]),
            ("image_latency", [f"fp32={tiny_export}", "--out", bad / "results"])]:
        code, err = main(module, capsys, *args)
        one_line_error(code, err, str(bad))
        assert err.count("\n") == 1, err  # no stage or progress line: it failed before any
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_more_groups_than_calibrated_steps_are_refused_with_the_largest_useful_value(
        tmp_path, capsys):
    code, err = main("dq_export.cli", capsys, "--init", "random", "--bits", "w8a8", "--groups",
                     "99", "--calib-steps", "10", "--out", tmp_path / "export")
    one_line_error(code, err, "--groups 99 is more than the 10 calibrated steps (pndm 10 "
                   "steps): use --groups 10 or fewer")
    assert list(tmp_path.iterdir()) == []
