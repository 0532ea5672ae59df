"""Tuned-threshold files without ComfyUI: round trip, atomic writes, hostile names, corrupted and
mismatched files (``nodes/presets.py``)."""

import json
import math
import os

import pytest
import torch
from safetensors.torch import save_file

from sparge_pack.nodes import presets as P

SIG = P.ModelSignature("video", "WanModel", 2, 128, (("blocks", 2),))


def thresholds(heads=2, layers=("double.0", "double.1"), mode="cdf"):
    per_layer = {}
    for i, layer in enumerate(layers):
        per_layer[layer] = {
            "cdf_threshold": torch.tensor([0.97, 0.99])[:heads] - 0.01 * i, "sim_threshold": torch.full((heads,), -0.1),
            "pv_threshold": torch.full((heads,), 12.0 + i), "topk": torch.ones(heads),
            "density": torch.tensor([0.4, math.nan])[:heads], "pv_skipped": torch.tensor([0.1, 0.0])[:heads]}
    return P.TunedThresholds(SIG, per_layer, mode, "hilbert", True, 0.05, 0.06, [(21, 30, 52)], 20, True, "0.1.0")


def test_round_trip(tmp_path):
    t = thresholds()
    path = P.save(t, str(tmp_path), "wan21 1.3b_480p")
    assert path == str(tmp_path / "wan21 1.3b_480p.safetensors")
    back = P.load(path)
    assert back.source == path and back.signature == SIG and list(back.layers) == ["double.0", "double.1"]
    assert (back.mode, back.token_order, back.protect_text, back.l1_target, back.pv_target) == \
        ("cdf", "hilbert", True, 0.05, 0.06)
    assert back.latent_grids == [(21, 30, 52)] and back.evaluations == 20 and back.complete and back.pack_version == "0.1.0"
    for layer, values in t.layers.items():
        for name, tensor in values.items():
            torch.testing.assert_close(back.layers[layer][name], tensor, equal_nan=True)
    options = back.kernel_options("double.1", 2, torch.device("cpu"))
    assert options["mode"] == "cdf"
    torch.testing.assert_close(options["pv_threshold"], torch.tensor([13.0, 13.0]))  # per head
    torch.testing.assert_close(options["cdf_threshold"], torch.tensor([0.96, 0.98]))
    assert back.kernel_options("double.1", 2, torch.device("cpu")) is options  # copied to a device once
    assert "2 layers x 2 heads, mode cdf" in back.summary() and "density 0.400" in back.summary()
    assert os.listdir(tmp_path) == ["wan21 1.3b_480p.safetensors"]  # no temporary left behind


def test_the_pv_precision_is_recorded_and_older_files_read_as_fast(tmp_path):
    from sparge_pack.nodes import override

    t = thresholds()
    assert t.precision == "fast"
    for name in override.PRECISIONS:  # the file's names are the node's
        t.precision = name
        back = P.load(P.save(t, str(tmp_path), name))
        assert back.precision == name and f"P·V {name}" in back.summary()
    tensors, meta = t.to_file_content()
    assert meta["precision"] == "accurate"
    del meta["precision"]  # a file written before the precision was recorded: tuned with FP8 ("fast")
    _write(tmp_path / "old.safetensors", tensors, meta)
    assert P.load(str(tmp_path / "old.safetensors")).precision == "fast"


def test_lambda_zero_turns_the_pv_skip_off_and_head_count_is_checked(tmp_path):
    t = thresholds()
    t.layers["double.1"]["pv_threshold"][1] = 0.0  # one head without the P·V skip -> inf for it
    t.layers["double.0"]["pv_threshold"].zero_()
    back = P.load(P.save(t, str(tmp_path), "x"))
    assert back.kernel_options("double.0", 2, torch.device("cpu"))["pv_threshold"] is None
    torch.testing.assert_close(back.kernel_options("double.1", 2, torch.device("cpu"))["pv_threshold"],
                               torch.tensor([13.0, math.inf]))
    with pytest.raises(ValueError, match=r"layer double.0 has 2 heads in .*x.safetensors but 12 in this model"):
        back.kernel_options("double.0", 12, torch.device("cpu"))


def test_existing_file_is_kept_unless_overwrite(tmp_path):
    first = P.save(thresholds(), str(tmp_path), "tuned")
    before = open(first, "rb").read()
    changed = thresholds()
    changed.l1_target = 0.03
    with pytest.raises(FileExistsError, match="turn 'overwrite' on"):
        P.save(changed, str(tmp_path), "tuned")
    assert open(first, "rb").read() == before
    P.save(changed, str(tmp_path), "tuned", overwrite=True)
    assert P.load(first).l1_target == 0.03


def test_an_interrupted_write_leaves_the_old_file_and_no_partial_one(tmp_path, monkeypatch):
    path = P.save(thresholds(), str(tmp_path), "tuned")
    before = open(path, "rb").read()

    def interrupted(src, dst):
        raise KeyboardInterrupt  # e.g. the user stops ComfyUI in the middle of the save

    monkeypatch.setattr(P.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        P.save(thresholds(heads=1), str(tmp_path), "tuned", overwrite=True)
    with pytest.raises(KeyboardInterrupt):
        P.save(thresholds(), str(tmp_path), "new")
    assert sorted(os.listdir(tmp_path)) == ["tuned.safetensors"] and open(path, "rb").read() == before


@pytest.mark.parametrize("name,expected", [
    ("../../outside", "_.._outside.safetensors"),
    ("/etc/passwd", "_etc_passwd.safetensors"),
    ("C:\\Windows\\system32", "C__Windows_system32.safetensors"),
    ("a/b/c.safetensors", "a_b_c.safetensors"),
    (".hidden", "hidden.safetensors"),
    ("~/x", "__x.safetensors"),
    ("CON", "_CON.safetensors"),
    ("nul.txt", "_nul.txt.safetensors"),
    ("wan 2.1 (480p)+hilbert", "wan 2.1 (480p)+hilbert.safetensors"),
    ("ünïcode-名前", "ünïcode-名前.safetensors"),
    ("line\nbreak\x00nul", "line_break_nul.safetensors"),
])
def test_hostile_names_stay_inside_the_folder(tmp_path, name, expected):
    folder = tmp_path / "spargeattn"
    path = P.save(thresholds(), str(folder), name)
    assert os.path.basename(path) == expected
    assert os.path.dirname(os.path.realpath(path)) == os.path.realpath(folder)
    assert os.listdir(folder) == [expected] and sorted(os.listdir(tmp_path)) == ["spargeattn"]


@pytest.mark.parametrize("name", ["", "   ", "..", ".", "/", "../..", ".safetensors", "x" * 300])
def test_unusable_names_are_refused(tmp_path, name):
    with pytest.raises(ValueError, match="file name"):
        P.save(thresholds(), str(tmp_path), name)
    assert os.listdir(tmp_path) == []


def _write(path, tensors, meta):
    save_file(tensors, str(path), metadata=meta)


def _content():
    return thresholds().to_file_content()


def _corrupt(kind, path):
    tensors, meta = _content()
    good = path.with_suffix(".good")
    _write(good, tensors, meta)
    data = good.read_bytes()
    good.unlink()
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(data[:-7])
    elif kind == "garbage":
        path.write_bytes(b"this is not a safetensors file" * 20)
    elif kind == "huge header":
        path.write_bytes((1 << 40).to_bytes(8, "little") + b"{}")
    elif kind == "too large":
        with open(path, "wb") as f:
            f.truncate(P.MAX_FILE_BYTES + 1)
    elif kind == "no metadata":
        _write(path, tensors, None)
    elif kind == "other format":
        _write(path, tensors, {**meta, "format": "some.other.pack"})
    elif kind == "newer version":
        _write(path, tensors, {**meta, "format_version": "99"})
    elif kind == "missing tensor":
        _write(path, {k: v for k, v in tensors.items() if k != "double.1.topk"}, meta)
    elif kind == "wrong shape":
        _write(path, {**tensors, "double.0.topk": torch.ones(3)}, meta)
    elif kind == "wrong dtype":
        _write(path, {**tensors, "double.0.topk": torch.ones(2, dtype=torch.float16)}, meta)
    elif kind == "tau out of range":
        _write(path, {**tensors, "double.0.cdf_threshold": torch.tensor([0.5, 1.5])}, meta)
    elif kind == "NaN threshold":
        _write(path, {**tensors, "double.1.pv_threshold": torch.tensor([math.nan, 1.0])}, meta)
    elif kind == "negative lambda":
        _write(path, {**tensors, "double.1.pv_threshold": torch.tensor([-1.0, 1.0])}, meta)
    elif kind == "layers not JSON":
        _write(path, tensors, {**meta, "layers": "double.0, double.1"})
    elif kind == "duplicate layers":
        _write(path, tensors, {**meta, "layers": json.dumps(["double.0", "double.0"])})
    elif kind == "bad mode":
        _write(path, tensors, {**meta, "mode": "dense"})
    elif kind == "bad heads":
        _write(path, tensors, {**meta, "heads": "two"})
    elif kind == "bad target":
        _write(path, tensors, {**meta, "l1_target": "nan"})
    elif kind == "bad precision":
        _write(path, tensors, {**meta, "precision": "fp8"})
    else:
        raise AssertionError(kind)


CORRUPTIONS = ["empty", "truncated", "garbage", "huge header", "too large", "no metadata", "other format",
               "newer version", "missing tensor", "wrong shape", "wrong dtype", "tau out of range", "NaN threshold",
               "negative lambda", "layers not JSON", "duplicate layers", "bad mode", "bad heads", "bad target",
               "bad precision"]


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_a_corrupted_file_gives_a_clear_error_naming_it(tmp_path, kind):
    path = tmp_path / f"{kind.replace(' ', '_')}.safetensors"
    _corrupt(kind, path)
    with pytest.raises(ValueError) as err:
        P.load(str(path))
    message = str(err.value)
    assert str(path) in message and "Delete the file or tune again" in message


def test_missing_file_names_it(tmp_path):
    with pytest.raises(ValueError, match=r"missing.safetensors: it cannot be read"):
        P.load(str(tmp_path / "missing.safetensors"))


def test_a_file_for_another_model_names_both_shapes(tmp_path):
    back = P.load(P.save(thresholds(), str(tmp_path), "wan_tiny"))
    other = P.ModelSignature("video", "WanModel", 12, 128, (("blocks", 30),))
    with pytest.raises(ValueError) as err:
        back.check_model(other)
    message = str(err.value)
    assert "wan_tiny.safetensors" in message
    assert "video, blocks 2, 2 heads x 128" in message and "video, blocks 30, 12 heads x 128" in message
    back.check_model(P.ModelSignature("video", "VaceWanModel", 2, 128, (("blocks", 2),)))  # same shape: accepted


def test_model_signature_reads_heads_width_and_block_lists():
    class Dit(torch.nn.Module):  # the attributes ComfyUI's Flux / HunyuanVideo carry
        def __init__(self):
            super().__init__()
            self.num_heads, self.hidden_size = 24, 3072
            self.double_blocks = torch.nn.ModuleList([torch.nn.Identity()] * 19)
            self.single_blocks = torch.nn.ModuleList([torch.nn.Identity()] * 38)

    sig = P.model_signature(Dit(), "text_first")
    assert sig == P.ModelSignature("text_first", "Dit", 24, 128, (("double_blocks", 19), ("single_blocks", 38)))
