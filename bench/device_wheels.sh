#!/usr/bin/env bash
# Builds .whl/ (ignored by git): the packages a CUDA GPU machine's image lacks, as wheels for CPython 3.12 on
# x86-64, at the versions the benchmark's tables were measured with. bench/device_setup.sh installs them there.
#     bash bench/device_wheels.sh       # here, where pip reaches PyPI; then carry .whl to the GPU machine
# The image already holds torch, lightning, transformers, einops, msgpack, ninja and py-cpuinfo; setuptools comes
# along for the SPDX license field the project's metadata uses (setuptools >= 77). liger-kernel (pure Python, Triton
# kernels; needs only torch and triton, both in the image) is the benchmark's rival loss. ~52 MB in all, most of it
# bitsandbytes' CUDA libraries. torchtune is not among them: its method is reimplemented in bench/runners.py.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
binary=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl)
python3 -m pip download -q "${binary[@]}" bitsandbytes==0.50.2 torchao==0.18.0 hydra-core==1.3.2 omegaconf==2.3.0 \
  pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 hjson==3.1.0 setuptools==80.9.0 \
  liger-kernel==0.8.5
# Source-only on PyPI: built here (pure Python, so the wheel runs there).
python3 -m pip wheel -q --no-deps -w .whl deepspeed==0.19.8 antlr4-python3-runtime==4.9.3
ls .whl
