"""Tuning inside a real ComfyUI (``COMFYUI_PATH``): a tiny random-weight Wan 2.1 built through ComfyUI's
loader is tuned through the "SpargeAttn Tune" node while ComfyUI's sampler runs, saved by "SpargeAttn
Save Tuned" into the registered ``spargeattn`` folder, listed and loaded by a fresh "SpargeAttn Patch",
and sampled again. The nodes run as ComfyUI runs them (``PREPARE_CLASS_CLONE`` sets their hidden
inputs, then ``execute``). On a CPU the kernel runs in the Triton interpreter (``TRITON_INTERPRET=1``
from conftest), which ``kernels.unavailable_reason`` accepts, so the calls are really tuned.
"""

import logging
import os

import pytest
import torch

from comfy_support import build_model, latent_for, require_comfy, sample

NODE_ID = "7"
LATENT = dict(frames=5)  # 5 x 8 x 8 = 320 tokens: 5 key blocks per query block


@pytest.fixture(scope="module")
def pack():
    require_comfy()
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs the Triton interpreter (TRITON_INTERPRET=1, set by conftest without a GPU) or a GPU")
    from sparge_pack.nodes import patch, tune_nodes

    return patch, tune_nodes


@pytest.fixture(scope="module")
def wan(pack):
    return build_model("wan", norm_scale=1.0)


@pytest.fixture
def folder(pack, tmp_path, monkeypatch):
    """ComfyUI's own folder_paths with the ``spargeattn`` entry pointed at a temporary folder."""
    import folder_paths

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "spargeattn", ([str(tmp_path)], {".safetensors"}))
    return tmp_path


def node(cls):
    return cls.PREPARE_CLASS_CLONE({"hidden_inputs": {"UNIQUE_ID": NODE_ID}})


def tune_node(pack, model, **overrides):
    _, tune_nodes = pack
    args = dict(mode="topk", l1_target=0.08, pv_target=0.0, sim_threshold=-0.1, start_percent=0.0, end_percent=1.0,
                dense_blocks="", min_tokens=0, protect_text=True, token_order="row-major", verbose=False)
    args.update(overrides)
    return node(tune_nodes.SpargeAttnTune).execute(model, **args).args[0]


def patch_node(pack, model, tuned, precision="fast"):
    patch, _ = pack
    return node(patch.SpargeAttnPatch).execute(
        model, mode="cdf", topk=0.5, cdf_threshold=0.98, sim_threshold=0.6, pv_threshold=0.0, start_percent=0.0,
        end_percent=1.0, dense_blocks="", min_tokens=0, protect_text=True, token_order="hilbert", verbose=False,
        tuned=tuned, precision=precision).args[0]


def test_tune_save_list_load_and_sample(pack, wan, folder, monkeypatch):
    import comfy.utils

    patch, tune_nodes = pack
    progress = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK",
                        lambda value, total, preview, node_id=None: progress.append((value, total, node_id)))
    latent = latent_for("wan", **LATENT)
    tuned = tune_node(pack, wan)
    out = sample(tuned, "wan", latent, steps=4)
    assert torch.equal(out, sample(wan, "wan", latent, steps=4))  # tuning hands the model dense attention

    state = tuned.get_attachment(patch.KEY)
    tuner = state.tuner
    assert list(tuner.layers) == ["double.0", "double.1"] and tuner.evaluations == 4
    assert state.last_run.totals()["dense_calls"]["tuning (dense output, sparse probe)"] == 8
    assert progress and progress[-1] == (8, 18, NODE_ID)  # 4 of 9 search steps in each of 2 layers, on the Tune node

    save = node(tune_nodes.SpargeAttnSaveTuned)
    result = save.execute(tuned, {"samples": out}, "tiny wan/480p", False)
    assert os.listdir(folder) == ["tiny wan_480p.safetensors"]
    assert "2 layers x 2 heads, mode topk" in result.ui.as_dict()["text"][0]
    with pytest.raises(FileExistsError, match="overwrite"):
        save.execute(tuned, {"samples": out}, "tiny wan_480p", False)

    schema = patch.SpargeAttnPatch.define_schema()
    combo = next(i for i in schema.inputs if i.id == "tuned")
    assert combo.options == ["none", "tiny wan_480p.safetensors"]

    patched = patch_node(pack, wan, "tiny wan_480p.safetensors")
    applied = patched.get_attachment(patch.KEY)
    assert applied.config.mode == "topk" and applied.config.token_order == "row-major"  # the file's, not the widgets'
    out2 = sample(patched, "wan", latent, steps=2)
    totals = applied.last_run.totals()
    assert totals["sparse_calls"] == 4 and set(applied.last_run.steps[-1].layers) == {"double.0", "double.1"}
    assert {key[0] for key in applied.thresholds._device_cache} == {"double.0", "double.1"}  # per-head tensors used
    assert torch.isfinite(out2).all()
    ref = sample(wan, "wan", latent, steps=2)
    assert ((out2 - ref).abs().sum() / ref.abs().sum()).item() < 0.1


def test_the_tune_precision_goes_to_the_probes_and_the_file(pack, wan, folder, caplog):
    patch, tune_nodes = pack
    tuned = tune_node(pack, wan, precision="accurate")
    state = tuned.get_attachment(patch.KEY)
    assert state.config.precision == "accurate"
    out = sample(tuned, "wan", latent_for("wan", **LATENT), steps=1)
    save = node(tune_nodes.SpargeAttnSaveTuned).execute(tuned, {"samples": out}, "wan_accurate", False)
    assert "P·V accurate" in save.ui.as_dict()["text"][0]
    with caplog.at_level(logging.WARNING, logger="root"):
        applied = patch_node(pack, wan, "wan_accurate.safetensors").get_attachment(patch.KEY)  # P·V fast
    assert applied.config.precision == "fast" and applied.thresholds.precision == "accurate"
    assert "was tuned with P·V precision 'accurate' and is applied with 'fast'" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="root"):
        patch_node(pack, wan, "wan_accurate.safetensors", precision="accurate")
    assert "was tuned with" not in caplog.text
    schema = tune_nodes.SpargeAttnTune.define_schema()
    assert [i.id for i in schema.inputs][-1] == "precision"  # last: saved workflows keep their widget order


def test_a_file_tuned_for_another_model_is_refused(pack, wan, folder):
    _, tune_nodes = pack
    tuned = tune_node(pack, wan)
    out = sample(tuned, "wan", latent_for("wan", **LATENT), steps=1)
    node(tune_nodes.SpargeAttnSaveTuned).execute(tuned, {"samples": out}, "wan_tiny", False)
    flux = build_model("flux")
    with pytest.raises(ValueError) as err:
        patch_node(pack, flux, "wan_tiny.safetensors")
    message = str(err.value)
    assert "wan_tiny.safetensors" in message and "video, blocks 2, 2 heads x 128" in message
    assert "text_first, double_blocks 1, single_blocks 1, 2 heads x 128" in message


def test_corrupted_and_missing_files_give_clear_errors(pack, wan, folder):
    (folder / "broken.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(ValueError, match=r"broken.safetensors: it is not a readable safetensors file"):
        patch_node(pack, wan, "broken.safetensors")
    with pytest.raises(FileNotFoundError, match="gone.safetensors' not found"):
        patch_node(pack, wan, "gone.safetensors")


def test_save_explains_what_is_missing(pack, wan, folder):
    patch, tune_nodes = pack
    save = node(tune_nodes.SpargeAttnSaveTuned)
    with pytest.raises(ValueError, match="not in tune mode"):
        save.execute(patch_node(pack, wan, "none"), {"samples": None}, "x", False)
    with pytest.raises(ValueError, match="no attention call was tuned"):
        save.execute(tune_node(pack, wan), {"samples": None}, "x", False)
    assert os.listdir(folder) == []


def test_cancel_stops_a_tuning_run(pack, wan):
    import comfy.model_management as mm

    tuned = tune_node(pack, wan)
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            sample(tuned, "wan", latent_for("wan", **LATENT), steps=2)
    finally:
        mm.interrupt_current_processing(False)


def test_bench_tune_plumbing(pack, tmp_path):
    """``bench/bench_tune.py --tiny`` as the lead runs it (a subprocess), the kernel in the interpreter."""
    import json
    import subprocess
    import sys

    from sparge_pack.nodes import presets

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "bench_tune.py")
    cmd = [sys.executable, script, "--tiny", "--modes", "topk", "--steps", "1", "--tune-steps", "2", "--warmup", "0",
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    results = json.loads((tmp_path / "tune.json").read_text())
    rec = results["modes"]["topk"]
    assert len(rec["tune"]["step_s"]) == 2 and rec["tune"]["s_per_step"] > 0 and rec["applied"]["finite"]
    assert [row["layer"] for row in rec["layers"]] == ["double.0", "double.1"]
    assert presets.load(rec["file"]).evaluations == 2
    assert "| tune topk |" in (tmp_path / "tune.md").read_text()
