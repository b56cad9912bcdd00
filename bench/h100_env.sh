# Sourced by the GPU-machine scripts (bench/h100.sh, bench/h100_speed.sh): unpacks the Vulkan loader from .gl/,
# installs the carried wheels from .whl/ into /tmp/site, and points wgpu at the NVIDIA Vulkan driver.
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
for f in .gl/*.deb; do dpkg -x "$f" /; done; ldconfig
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/pkg PYTHONUNBUFFERED=1 XDG_RUNTIME_DIR=/tmp/xdg
mkdir -p -m 700 $XDG_RUNTIME_DIR
if ! python3 -c "import wgpu; a = wgpu.gpu.request_adapter_sync(); assert 'NVIDIA' in a.info['device']" \
    2>/dev/null; then
  export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
fi
