#!/usr/bin/env bash
# Downloads the wheels that the accelerator machine lacks into DIR (default .whl), for its
# Python 3.12 x86-64. That machine has torch 2.11 (CUDA 13), numpy, scipy, pandas, safetensors,
# einops, tokenizers 0.23, transformers 5 ... but no registry: Composer, Streaming, OmegaConf
# and their imports travel as wheels (about 41 MB). transformers 4.57 + huggingface_hub 0.36 +
# tokenizers 0.22 are carried because Streaming and this project need transformers < 5.
# pytest travels too, for the tests marked gpu (docs/gpu.md).
# antlr4-python3-runtime has no wheel on the registry, so one is built from its sdist.
set -euo pipefail
dir=${1:-.whl}
mkdir -p "$dir"
plat=(--python-version 3.12 --implementation cp --only-binary=:all:
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64)
python3 -m pip download -q --no-deps "${plat[@]}" -d "$dir" \
  mosaicml==0.32.1 mosaicml-streaming==0.13.0 mosaicml-cli==0.7.5 omegaconf==2.3.0 \
  transformers==4.57.6 huggingface_hub==0.36.2 tokenizers==0.22.1 \
  argcomplete arrow backoff 'gql==3.5.3' 'graphql-core==3.2.14' prompt_toolkit==3.0.36 questionary==2.0.1 \
  ruamel.yaml ruamel.yaml.clib validators termcolor wcwidth websockets 'coolname<3' 'importlib-metadata<9' \
  torch_optimizer==0.3.0 pytorch_ranger boto3 botocore s3transfer jmespath catalogue \
  zstd brotli python-snappy cramjam types-python-dateutil tzdata \
  pytest pluggy iniconfig  # to run tests/test_gpu.py there: python3 -m pytest -p no:cacheprovider -m gpu
python3 -m pip wheel -q --no-deps -w "$dir" antlr4-python3-runtime==4.9.3
ls "$dir" | wc -l
