# Offline ComfyUI environment for a GPU machine without a package registry (run from the pack root).
#
#   bash bench/gpu_comfy_env.sh download   # a machine with PyPI: fetch the wheels into .carry/wheels
#   bash bench/gpu_comfy_env.sh pack       # then: pack wheels + ComfyUI into .carry/packed (fits one carry)
#   source bench/gpu_comfy_env.sh          # GPU machine: unpack or install them, export COMFYUI_PATH
#
# The GPU image already has torch 2.11 (CUDA 13), torchvision, torchaudio, triton, numpy, transformers,
# tokenizers, sentencepiece, safetensors, einops, pyyaml, pillow, scipy, tqdm, psutil, aiohttp and
# yarl. Running ComfyUI in-process (comfy.sd, comfy.sample, comfy_api.latest; no server, no frontend)
# needs only these on top:
#   av             hard import of comfy_api.latest (video types)
#   comfy-aimdo    hard import of comfy.model_patcher / comfy.ops in newer ComfyUI (dynamic VRAM; off in-process)
#   comfy-kitchen  ComfyUI's RoPE (and fp8/fp4) kernels. pip gives a Linux x86_64 user its manylinux wheel,
#                  whose CUDA backend ComfyUI enables with a CUDA 13 torch: the fused RoPE kernel. Its
#                  pure-Python wheel (what this script carried until 2026-12-03) leaves ComfyUI on the
#                  backend of plain torch ops, which makes every step of both the unpatched and the patched
#                  model slower by the same RoPE time (bench_e2e.py prints which backend ran).
#   torchsde, trampoline   hard import of comfy.k_diffusion.sampling
#
# The wheels (~100 MB) and ComfyUI (~24 MB) are more than one call may carry (64 MiB), so `pack` unpacks them
# into one site folder (without comfy-kitchen's ROCm backend, 151 MB of it) and xz-compresses that and
# the ComfyUI checkout: ~60 MiB. Carry [".carry/packed"] (plus whatever else the call needs). Without
# .carry/packed, `source` falls back to pip-installing .carry/wheels and a carried .comfyui, as before.

_wheels_dir=.carry/wheels
_packed_dir=.carry/packed
_site_dir=.carry/site
_native="av==19.0.2 comfy-aimdo==0.6.0 comfy-kitchen==0.2.40"
_pure="torchsde==0.2.6 trampoline==0.1.2"
_py=${PYTHON:-python3}

if [ "${1:-}" = "download" ]; then
  mkdir -p "$_wheels_dir" || exit 1
  # cp312 manylinux wheels for the native packages (comfy-kitchen's with its CUDA backend); py3-none-any
  # for the rest. A pure comfy-kitchen wheel from an earlier download would shadow the CUDA one.
  rm -f "$_wheels_dir"/comfy_kitchen-*-py3-none-any.whl
  $_py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --dest "$_wheels_dir" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_28_x86_64 $_native \
    && $_py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform any \
      --dest "$_wheels_dir" $_pure \
    && ls -l "$_wheels_dir" && du -sh "$_wheels_dir"
  exit $?
fi

if [ "${1:-}" = "pack" ]; then
  comfy=${COMFYUI_PATH:-$PWD/.comfyui/ComfyUI}
  [ -f "$comfy/comfy/sd.py" ] || { echo "gpu_comfy_env pack: no ComfyUI at $comfy (set COMFYUI_PATH)" >&2; exit 1; }
  ls "$_wheels_dir"/*.whl >/dev/null 2>&1 || { echo "gpu_comfy_env pack: run 'download' first" >&2; exit 1; }
  tmp=$(mktemp -d) || exit 1
  trap 'rm -rf "$tmp"' EXIT
  for w in "$_wheels_dir"/*.whl; do
    $_py -m zipfile -e "$w" "$tmp/site" || exit 1
  done
  rm -rf "$tmp/site/comfy_kitchen/backends/hip"  # ROCm only
  mkdir -p "$_packed_dir" || exit 1
  tar -C "$tmp/site" -cf - . | xz -T0 -6 > "$_packed_dir/site.tar.xz" || exit 1
  tar -C "$(dirname "$comfy")" --exclude=.git --exclude=__pycache__ -cf - "$(basename "$comfy")" \
    | xz -T0 -6 > "$_packed_dir/comfyui.tar.xz" || exit 1
  ls -l "$_packed_dir"
  size=$(du -cb "$_packed_dir"/*.tar.xz | tail -1 | cut -f1)
  echo "gpu_comfy_env pack: $((size / 1048576)) MiB in $_packed_dir (one call carries 64 MiB in all)"
  [ "$size" -lt $((62 * 1048576)) ] || { echo "gpu_comfy_env pack: too large to carry with the rest" >&2; exit 1; }
  exit 0
fi

_gpu_comfy_env() {
  local comfy=${COMFYUI_PATH:-$PWD/.comfyui/ComfyUI}
  if [ -f "$_packed_dir/site.tar.xz" ]; then
    rm -rf "$_site_dir" && mkdir -p "$_site_dir" && tar -C "$_site_dir" -xJf "$_packed_dir/site.tar.xz" || return 1
    export PYTHONPATH="$PWD/$_site_dir${PYTHONPATH:+:$PYTHONPATH}"
    if [ ! -f "$comfy/comfy/sd.py" ] && [ -f "$_packed_dir/comfyui.tar.xz" ]; then
      comfy=$PWD/.comfyui/ComfyUI
      mkdir -p .comfyui && tar -C .comfyui -xJf "$_packed_dir/comfyui.tar.xz" || return 1
    fi
  else
    if ! ls "$_wheels_dir"/*.whl >/dev/null 2>&1; then
      echo "gpu_comfy_env: neither $PWD/$_packed_dir nor wheels in $PWD/$_wheels_dir: carry .carry/packed" \
        "(made by 'bash bench/gpu_comfy_env.sh download' then 'pack')" >&2
      return 1
    fi
    $_py -m pip install -q --disable-pip-version-check --no-index --no-deps --find-links "$_wheels_dir" \
      $_native $_pure || return 1
  fi
  if [ ! -f "$comfy/comfy/sd.py" ]; then
    echo "gpu_comfy_env: no ComfyUI at $comfy: set COMFYUI_PATH, or carry .carry/packed (or .comfyui)" >&2
    return 1
  fi
  export COMFYUI_PATH=$comfy
  export PYTHONUNBUFFERED=1
  $_py -c 'import av, comfy_aimdo, comfy_kitchen, torchsde, torch, triton, importlib.metadata as md
print("gpu_comfy_env: torch", torch.__version__, "triton", triton.__version__, "av", av.__version__,
      "comfy-kitchen", md.version("comfy-kitchen"), "backends:",
      ", ".join(n for n, s in sorted(comfy_kitchen.list_backends().items()) if s["available"]),
      "cuda" if torch.cuda.is_available() else "NO CUDA")' || return 1
  echo "gpu_comfy_env: COMFYUI_PATH=$COMFYUI_PATH"
}

_gpu_comfy_env
