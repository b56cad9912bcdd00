#!/bin/bash
# Install the system packages tabgpt's tests and demo need, only where missing (Debian/Ubuntu, as root):
#   chromium              headless browser for the page tests (WebGPU on SwiftShader)
#   mesa-vulkan-drivers   lavapipe, a Vulkan driver on the CPU, so wgpu works without a GPU
#   libvulkan1            the Vulkan loader
set -euo pipefail
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1 || need+=(mesa-vulkan-drivers)
ldconfig -p | grep -q libvulkan.so.1 || need+=(libvulkan1)
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" != 0 ]; then
  echo "missing system packages: ${need[*]}; install them with: sudo apt-get install -y ${need[*]}" >&2
  exit 1
fi
echo "installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q "${need[@]}" fonts-dejavu-core
