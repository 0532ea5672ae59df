"""Tuned thresholds on disk: one ``<name>.safetensors`` per tuned model, per layer and per head.

File format (``FORMAT`` = "spargeattn.thresholds", ``FORMAT_VERSION`` = 1)
--------------------------------------------------------------------------
Tensors, float32, one value per attention head, for every tuned layer ``L`` (``"double.3"``,
``"single.10"``, or ``"call.7"`` for models that report no block index):

* ``L.cdf_threshold`` τ, ``L.sim_threshold`` θ, ``L.pv_threshold`` λ (log2 units, 0 = P·V skip
  off), ``L.topk``: the kernel's thresholds. ``mode`` (metadata) says which of τ / top-k applies;
  the other holds 1.0.
* ``L.density`` (fraction of Q·Kᵀ blocks computed) and ``L.pv_skipped`` (fraction of computed
  blocks whose P·V was skipped), measured during tuning at the saved setting; NaN where the
  setting changed after its last measurement. Informative only.

Metadata (strings; JSON where noted): ``format``, ``format_version``, ``pack_version``, ``family``,
``model_class``, ``heads``, ``head_dim``, ``blocks`` (JSON, block lists and their lengths),
``layers`` (JSON list, in call order), ``latent_grids`` (JSON list of the (T', H', W') grids seen),
``mode``, ``token_order``, ``protect_text``, ``l1_target``, ``pv_target``, ``evaluations`` (model
evaluations seen by the tuner), ``complete`` ("true" when every layer finished the search), ``precision``
(the P·V precision the errors were measured with, "fast" or "accurate"; files written before it existed
were tuned with "fast" and read as such).

Reading never trusts the file: size, header, metadata, every tensor's name, shape, dtype and range
are checked, and any problem raises a ``ValueError`` that names the file. Writing is atomic (a
temporary file in the same folder, flushed, then ``os.replace``), so an interrupted save leaves
either the old file or none, never a partial one. Names are reduced to a plain file name inside the
folder. No ComfyUI import here: the node glue passes folders in.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import unicodedata
from dataclasses import dataclass, field

import torch

from .override import PRECISIONS

FORMAT = "spargeattn.thresholds"
FORMAT_VERSION = 1
FOLDER = "spargeattn"
EXTENSION = ".safetensors"
THRESHOLDS = ("cdf_threshold", "sim_threshold", "pv_threshold", "topk")
MEASURED = ("density", "pv_skipped")
#: Accepted range of each stored value (NaN is allowed only for the measured ones).
RANGES = {"cdf_threshold": (0.0, 1.0), "sim_threshold": (-1.0, 1.0), "pv_threshold": (0.0, 64.0),
          "topk": (0.0, 1.0), "density": (0.0, 1.0), "pv_skipped": (0.0, 1.0)}
MAX_FILE_BYTES = 64 << 20  # a 100-layer, 64-head file is ~200 KB
MAX_NAME = 120
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}


@dataclass(frozen=True)
class ModelSignature:
    """What a thresholds file must agree with: model family, attention heads and transformer blocks.

    Attributes
    ----------
    family : str
        Token-order family (``adapters.model_family``).
    model_class : str
        Class name of the diffusion model (informative; not compared).
    heads, head_dim : int
        Attention heads per layer and their size.
    blocks : tuple of (str, int)
        Block lists of the model and their lengths, e.g. ``(("blocks", 30),)`` for Wan 2.1-1.3B.
    """

    family: str
    model_class: str
    heads: int
    head_dim: int
    blocks: tuple

    def shape(self) -> str:
        """E.g. ``"video, blocks 30, 12 heads x 128"``."""
        blocks = ", ".join(f"{name} {n}" for name, n in self.blocks) or "no block list"
        return f"{self.family}, {blocks}, {self.heads} heads x {self.head_dim}"

    def matches(self, other: "ModelSignature") -> bool:
        return (self.family, self.heads, self.head_dim, self.blocks) == \
            (other.family, other.heads, other.head_dim, other.blocks)


def model_signature(diffusion_model, family: str) -> ModelSignature:
    """The :class:`ModelSignature` of a ComfyUI diffusion model (Wan, Flux, HunyuanVideo, ...)."""
    heads = int(getattr(diffusion_model, "num_heads", 0) or 0)
    width = getattr(diffusion_model, "dim", None) or getattr(diffusion_model, "hidden_size", None) or 0
    blocks = tuple((name, len(getattr(diffusion_model, name))) for name in ("double_blocks", "single_blocks", "blocks")
                   if isinstance(getattr(diffusion_model, name, None), torch.nn.ModuleList))
    return ModelSignature(family, type(diffusion_model).__name__, heads, int(width) // heads if heads else 0, blocks)


@dataclass
class TunedThresholds:
    """Per-layer, per-head thresholds of one tuned model (the content of one file).

    Attributes
    ----------
    signature : ModelSignature
    layers : dict[str, dict[str, torch.Tensor]]
        Per layer, in call order: ``THRESHOLDS`` and ``MEASURED`` names -> float32 CPU tensors (heads,).
    mode, token_order : str
        The kernel mode ("cdf" or "topk") and token order the thresholds were tuned for.
    protect_text : bool
    l1_target, pv_target : float
        Stage-1 and stage-2 relL1 targets (pv_target 0: stage 2 was off).
    latent_grids : list of (T', H', W')
    evaluations : int
        Model evaluations the tuner saw.
    complete : bool
        Every layer finished the search (see ``nodes.tune``).
    pack_version : str
    precision : str
        The P·V precision the tuner measured with ("fast": FP8, "accurate": fp16).
    source : str
        Where the thresholds come from (the file's path), for messages.
    """

    signature: ModelSignature
    layers: dict
    mode: str
    token_order: str
    protect_text: bool
    l1_target: float
    pv_target: float
    latent_grids: list = field(default_factory=list)
    evaluations: int = 0
    complete: bool = False
    pack_version: str = ""
    precision: str = "fast"
    source: str = "the tuned thresholds"
    _device_cache: dict = field(default_factory=dict, repr=False, compare=False)

    # ---- use ----

    def check_model(self, signature: ModelSignature) -> None:
        """Raise a ValueError naming both shapes when ``signature`` is not the tuned model's."""
        if not self.signature.matches(signature):
            raise ValueError(
                f"SpargeAttn: {self.source} was tuned for {self.signature.model_class} ({self.signature.shape()}), "
                f"but this model is {signature.model_class} ({signature.shape()}). Pick the file tuned for this "
                "model, or tune it with the SpargeAttn Tune node.")

    def kernel_options(self, layer: str, heads: int, device: torch.device) -> dict:
        """``sparge_attn`` keyword arguments for ``layer``: per-head tensors on ``device``.

        The tensors are copied to a device once and reused (no copy per call). λ is passed per head;
        a head stored with λ = 0 (P·V skip off) gets ``inf``, and a layer with no head skipping gets
        ``None`` (stage 2 off, no skip bookkeeping in the kernel).

        Raises
        ------
        KeyError
            ``layer`` is not in the file (the caller keeps that layer dense).
        ValueError
            The layer has a different number of heads than the call.
        """
        values = self.layers[layer]
        stored = values["topk"].numel()
        if stored != heads:
            raise ValueError(f"SpargeAttn: layer {layer} has {stored} heads in {self.source} but {heads} in this "
                             "model; the file belongs to another model")
        key = (layer, str(device))
        cached = self._device_cache.get(key)
        if cached is not None:
            return cached
        lam = values["pv_threshold"].float()
        pv = torch.where(lam > 0, lam, torch.full_like(lam, math.inf)).to(device) if bool((lam > 0).any()) else None
        options = {"mode": self.mode, "pv_threshold": pv,
                   **{name: values[name].to(device) for name in ("cdf_threshold", "sim_threshold", "topk")}}
        self._device_cache[key] = options
        return options

    def summary(self) -> str:
        """One line: layers, heads, targets, mean density and P·V skip measured while tuning."""
        dens = torch.cat([v["density"] for v in self.layers.values()]) if self.layers else torch.zeros(0)
        skip = torch.cat([v["pv_skipped"] for v in self.layers.values()]) if self.layers else torch.zeros(0)

        def mean(t):
            t = t[~torch.isnan(t)]
            return f"{t.mean().item():.3f}" if t.numel() else "n/a"

        stage2 = f", P·V target {self.pv_target:g}" if self.pv_target else ", P·V skip off"
        return (f"{len(self.layers)} layers x {self.signature.heads} heads, mode {self.mode}, P·V {self.precision}, "
                f"relL1 target {self.l1_target:g}{stage2}; density {mean(dens)}, P·V skipped {mean(skip)} (measured while tuning, "
                f"{self.evaluations} evaluations{'' if self.complete else ', search not finished in every layer'})")

    # ---- file ----

    def to_file_content(self) -> tuple[dict, dict]:
        """(tensors, metadata) as written to the safetensors file."""
        tensors = {f"{layer}.{name}": values[name].to(torch.float32).contiguous()
                   for layer, values in self.layers.items() for name in THRESHOLDS + MEASURED}
        s = self.signature
        meta = {
            "format": FORMAT, "format_version": str(FORMAT_VERSION), "pack_version": self.pack_version,
            "family": s.family, "model_class": s.model_class, "heads": str(s.heads), "head_dim": str(s.head_dim),
            "blocks": json.dumps([list(b) for b in s.blocks]), "layers": json.dumps(list(self.layers)),
            "latent_grids": json.dumps([list(g) for g in self.latent_grids]), "mode": self.mode,
            "token_order": self.token_order, "protect_text": json.dumps(self.protect_text),
            "l1_target": repr(float(self.l1_target)), "pv_target": repr(float(self.pv_target)),
            "evaluations": str(self.evaluations), "complete": json.dumps(self.complete),
            "precision": self.precision,
        }
        return tensors, meta

    @classmethod
    def from_file_content(cls, tensors: dict, meta: dict) -> "TunedThresholds":
        """Validate and build; raises ValueError (without the file name: :func:`load` adds it)."""
        if meta.get("format") != FORMAT:
            raise ValueError(f"not a SpargeAttn thresholds file (metadata 'format' is {meta.get('format')!r})")
        version = _int(meta, "format_version")
        if version > FORMAT_VERSION:
            raise ValueError(f"format version {version} is newer than this pack reads ({FORMAT_VERSION}); "
                             "update the SpargeAttn pack")
        heads, head_dim = _int(meta, "heads"), _int(meta, "head_dim")
        if heads < 1 or head_dim < 1:
            raise ValueError(f"heads ({heads}) and head_dim ({head_dim}) must be positive")
        layers = _json(meta, "layers", list)
        blocks = _json(meta, "blocks", list)
        grids = _json(meta, "latent_grids", list)
        if not layers or len(set(layers)) != len(layers) or not all(isinstance(x, str) and x for x in layers):
            raise ValueError("'layers' must be a non-empty list of distinct layer names")
        if not all(isinstance(b, list) and len(b) == 2 and isinstance(b[0], str) and isinstance(b[1], int)
                   for b in blocks):
            raise ValueError("'blocks' must be a list of [name, count] pairs")
        mode = meta.get("mode")
        if mode not in ("cdf", "topk"):
            raise ValueError(f"mode must be 'cdf' or 'topk', got {mode!r}")
        token_order = meta.get("token_order")
        if token_order not in ("row-major", "hilbert"):
            raise ValueError(f"token_order must be 'row-major' or 'hilbert', got {token_order!r}")
        precision = meta.get("precision", "fast")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
        expected = {f"{layer}.{name}" for layer in layers for name in THRESHOLDS + MEASURED}
        if set(tensors) != expected:
            extra, missing = sorted(set(tensors) - expected), sorted(expected - set(tensors))
            raise ValueError(f"tensors do not match the layer list (missing {missing[:4]}, unexpected {extra[:4]})")
        per_layer = {}
        for layer in layers:
            values = {}
            for name in THRESHOLDS + MEASURED:
                t = tensors[f"{layer}.{name}"]
                if t.dtype != torch.float32 or tuple(t.shape) != (heads,):
                    raise ValueError(f"{layer}.{name} is {t.dtype} {tuple(t.shape)}; expected float32 ({heads},)")
                lo, hi = RANGES[name]
                bad = ~((t >= lo) & (t <= hi))
                if name in MEASURED:
                    bad &= ~torch.isnan(t)
                if bool(bad.any()):
                    raise ValueError(f"{layer}.{name} has values outside [{lo}, {hi}]: {t[bad][:4].tolist()}")
                values[name] = t.clone()
            per_layer[layer] = values
        l1, pv = _float(meta, "l1_target"), _float(meta, "pv_target")
        return cls(
            signature=ModelSignature(str(meta.get("family", "")), str(meta.get("model_class", "")), heads, head_dim,
                                     tuple((b[0], b[1]) for b in blocks)),
            layers=per_layer, mode=mode, token_order=token_order,
            protect_text=_json(meta, "protect_text", bool), l1_target=l1, pv_target=pv,
            latent_grids=[tuple(g) for g in grids], evaluations=_int(meta, "evaluations"),
            complete=_json(meta, "complete", bool), pack_version=str(meta.get("pack_version", "")),
            precision=precision)


def _int(meta: dict, key: str) -> int:
    try:
        return int(meta[key])
    except (KeyError, ValueError) as e:
        raise ValueError(f"metadata {key!r} is missing or not an integer") from e


def _float(meta: dict, key: str) -> float:
    try:
        value = float(meta[key])
    except (KeyError, ValueError) as e:
        raise ValueError(f"metadata {key!r} is missing or not a number") from e
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"metadata {key!r} must be a finite number >= 0, got {value}")
    return value


def _json(meta: dict, key: str, kind: type):
    try:
        value = json.loads(meta[key])
    except (KeyError, ValueError) as e:
        raise ValueError(f"metadata {key!r} is missing or not valid JSON") from e
    if not isinstance(value, kind):
        raise ValueError(f"metadata {key!r} must be a {kind.__name__}, got {type(value).__name__}")
    return value


def clean_name(name: str) -> str:
    """A user-given name as a plain file name ``<stem>.safetensors`` that stays inside its folder.

    Path separators, drive colons and other characters outside letters, digits, ``_ - . ( ) +`` and
    spaces become ``_``; leading dots and spaces are dropped (no hidden files, no ``..``); a trailing
    ``.safetensors`` is not doubled; Windows device names get a ``_`` prefix.

    Raises
    ------
    ValueError
        Nothing usable is left, or the name is longer than ``MAX_NAME`` characters.
    """
    stem = unicodedata.normalize("NFC", str(name)).strip()
    if stem.lower().endswith(EXTENSION):
        stem = stem[: -len(EXTENSION)]
    stem = re.sub(r"[^\w\-.()+ ]", "_", stem)
    stem = stem.lstrip(". ").rstrip(". ")
    if not stem.strip("_"):
        raise ValueError(f"SpargeAttn: {name!r} is not a usable file name; use letters, digits, '-' or '_', "
                         "e.g. 'wan21_1.3b_480p'")
    if len(stem) > MAX_NAME:
        raise ValueError(f"SpargeAttn: the file name is {len(stem)} characters long; use at most {MAX_NAME}")
    if stem.split(".")[0].upper() in _WINDOWS_RESERVED:
        stem = "_" + stem
    return stem + EXTENSION


def save(thresholds: TunedThresholds, folder: str, name: str, overwrite: bool = False) -> str:
    """Write ``thresholds`` to ``folder/<clean name>.safetensors`` atomically; returns the path.

    Raises
    ------
    FileExistsError
        The file exists and ``overwrite`` is False.
    ValueError
        The name is not usable (:func:`clean_name`).
    """
    from safetensors.torch import save as to_bytes

    file_name = clean_name(name)
    os.makedirs(folder, exist_ok=True)
    folder = os.path.realpath(folder)
    path = os.path.join(folder, file_name)
    if os.path.dirname(os.path.realpath(path)) != folder:
        raise ValueError(f"SpargeAttn: {name!r} does not name a file inside {folder}")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"SpargeAttn: {path} exists; choose another name or turn 'overwrite' on")
    data = to_bytes(*thresholds.to_file_content())
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".spargeattn-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load(path: str) -> TunedThresholds:
    """Read and validate a thresholds file.

    Raises
    ------
    ValueError
        Naming the file and the problem (unreadable, corrupted, not ours, out-of-range values).
    """
    from safetensors import SafetensorError, safe_open

    def bad(why: str) -> ValueError:
        return ValueError(f"SpargeAttn: cannot use {path}: {why}. Delete the file or tune again with the "
                          "SpargeAttn Tune node.")

    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise bad(f"it cannot be read ({e.strerror or e})") from e
    if size > MAX_FILE_BYTES:
        raise bad(f"it is {size} bytes, more than a thresholds file can be ({MAX_FILE_BYTES})")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise bad(f"it is not a readable safetensors file ({e})") from e
    try:
        thresholds = TunedThresholds.from_file_content(tensors, meta)
    except ValueError as e:
        raise bad(str(e)) from e
    thresholds.source = path
    return thresholds
