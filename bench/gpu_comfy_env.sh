# Offline ComfyUI environment for a GPU machine without a package registry (run from the pack root).
#
#   source bench/gpu_comfy_env.sh          # GPU machine: install .carry/wheels offline, export COMFYUI_PATH
#   bash bench/gpu_comfy_env.sh download   # a machine with PyPI: fetch those wheels into .carry/wheels
#
# The GPU image already has torch 2.11 (CUDA 13), torchvision, torchaudio, triton, numpy, transformers,
# tokenizers, sentencepiece, safetensors, einops, pyyaml, pillow, scipy, tqdm, psutil, aiohttp and
# yarl. Running ComfyUI v0.19.3 in-process (comfy.sd, comfy.sample, comfy_api.latest; no server, no
# frontend) needs only these on top:
#   av             hard import of comfy_api.latest (video types); 35 MB, the bulk of the set
#   comfy-aimdo    hard import of comfy.model_patcher / comfy.ops (dynamic VRAM; stays off in-process)
#   comfy-kitchen  the pure-Python wheel (260 KB): ComfyUI imports it in a try; without it, it logs an
#                  error. Its CUDA backend (the 68 MB manylinux wheel: fused RoPE, fp8/fp4) is left out.
#   torchsde, trampoline   hard import of comfy.k_diffusion.sampling
# Carry the wheels and ComfyUI with the run: carry [".carry", ".comfyui"] (about 59 MB in all).

_wheels_dir=.carry/wheels
_native="av==19.0.2 comfy-aimdo==0.6.0"
_pure="comfy-kitchen==0.2.40 torchsde==0.2.6 trampoline==0.1.2"
_py=${PYTHON:-python3}

if [ "${1:-}" = "download" ]; then
  mkdir -p "$_wheels_dir" || exit 1
  # cp312 manylinux wheels for the native packages; py3-none-any for the rest (this also picks the
  # pure-Python comfy-kitchen instead of its 68 MB CUDA build).
  $_py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --dest "$_wheels_dir" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 $_native \
    && $_py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform any \
      --dest "$_wheels_dir" $_pure \
    && ls -l "$_wheels_dir" && du -sh "$_wheels_dir"
  exit $?
fi

_gpu_comfy_env() {
  local comfy=${COMFYUI_PATH:-$PWD/.comfyui/ComfyUI}
  if [ ! -f "$comfy/comfy/sd.py" ]; then
    echo "gpu_comfy_env: no ComfyUI at $comfy: set COMFYUI_PATH, or run from the pack root and carry .comfyui" >&2
    return 1
  fi
  if ! ls "$_wheels_dir"/*.whl >/dev/null 2>&1; then
    echo "gpu_comfy_env: no wheels in $PWD/$_wheels_dir: carry .carry" \
      "(filled by 'bash bench/gpu_comfy_env.sh download')" >&2
    return 1
  fi
  $_py -m pip install -q --disable-pip-version-check --no-index --no-deps --find-links "$_wheels_dir" \
    $_native $_pure || return 1
  export COMFYUI_PATH=$comfy
  export PYTHONUNBUFFERED=1
  $_py -c 'import av, comfy_aimdo, comfy_kitchen, torchsde, torch, triton
print("gpu_comfy_env: torch", torch.__version__, "triton", triton.__version__, "av", av.__version__,
      "cuda" if torch.cuda.is_available() else "NO CUDA")' || return 1
  echo "gpu_comfy_env: COMFYUI_PATH=$COMFYUI_PATH"
}

_gpu_comfy_env
