"""Test set-up.

* Without a CUDA GPU the kernels run in the Triton interpreter: ``TRITON_INTERPRET=1`` is set here,
  before anything imports Triton.
* The repository root is loaded as a package named ``sparge_pack`` (``sparge_pack.kernels``,
  ``sparge_pack.nodes``), the way ComfyUI loads a custom node, whatever the checkout's folder is
  called. The checkout's root is not on ``sys.path``: ComfyUI's top-level ``nodes`` module (and any other
  package named like one of our folders) is never shadowed.
* Randomized tests draw a fresh seed per test (:func:`random_seed`) and name it when they fail;
  ``SPARGEATTN_TEST_SEED=<seed>`` replays it, e.g.
  ``SPARGEATTN_TEST_SEED=1246448362 python -m pytest tests/test_kernels.py -k "random_sweep and [0]"``
  (a sweep case is drawn from its seed alone, so any one index replays it).
"""

import importlib.util
import os
import sys

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK = "sparge_pack"


def _load_pack():
    if PACK in sys.modules:
        return sys.modules[PACK]
    spec = importlib.util.spec_from_file_location(
        PACK, os.path.join(ROOT, "__init__.py"), submodule_search_locations=[ROOT]
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules[PACK] = mod
    spec.loader.exec_module(mod)
    return mod


def _hide_checkout_root():
    """Take the checkout's root off ``sys.path`` (``python -m pytest`` puts the working directory there): its
    folders would otherwise be importable as top-level modules and shadow others of the same name, as in a
    real ComfyUI they never are. Seen: diffusers (via the CogVideoX wrapper) probes for Hugging Face's
    ``kernels`` package and imported our ``kernels/`` instead; ComfyUI owns the top-level ``nodes``."""
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != ROOT]


_load_pack()
_hide_checkout_root()
# Import the kernels now, while TRITON_INTERPRET is set: Triton decides interpreter or compiler when
# the kernels are defined, and a test that unsets the variable later must not change that.
importlib.import_module(PACK + ".kernels")


def random_seed() -> int:
    """A fresh 32-bit seed, or ``SPARGEATTN_TEST_SEED`` when set (to replay a failure)."""
    fixed = os.environ.get("SPARGEATTN_TEST_SEED")
    if fixed:
        return int(fixed)
    return int.from_bytes(os.urandom(4), "little")


def pytest_report_header(config):
    seed = os.environ.get("SPARGEATTN_TEST_SEED")
    fixed = [f"random seeds: all {seed} (SPARGEATTN_TEST_SEED)"] if seed else []
    if ON_GPU:
        return [f"kernels: {torch.cuda.get_device_name()} (real sizes)"] + fixed
    return ["kernels: no CUDA GPU -> Triton interpreter (TRITON_INTERPRET=1), small sizes"] + fixed
