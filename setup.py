"""llada-cpt: block-diffusion continual pre-training and post-training on Megatron-Core."""
from setuptools import find_packages, setup

EXTRAS = {
    "test": ["pytest>=8", "pytest-timeout>=2.3", "ruff>=0.17,<0.18"],  # ruff: the lint step of scripts/test.sh
    "hf": ["transformers>=4.45,<6", "safetensors>=0.4"],
    "rl": ["math-verify>=0.7,<1"],
    "gpu": ["nvidia-cudnn-frontend>=1.5"],
    # `llada-cpt lm-eval`; accelerate runs the harness's own `hf` model (the reference in tests and benchmarks)
    "eval": ["lm-eval>=0.4.13,<0.5", "accelerate>=0.26"],
}
EXTRAS["all"] = sorted({d for v in EXTRAS.values() for d in v})

setup(
    name="llada-cpt",
    version="0.1.0",
    description="Turn autoregressive checkpoints into block-diffusion LMs with Megatron-Core",
    # Every import name lives under llada_cpt: a top-level `kernels` package once shadowed Hugging
    # Face's `kernels` distribution (imported by transformers) and broke fresh installs.
    packages=find_packages(include=["llada_cpt", "llada_cpt.*"]),
    package_data={"llada_cpt": ["data/bundled/*", "configs/*.yaml", "eval_tasks/*.yaml"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4,<3",
        "megatron-core>=0.16.1,<0.20",
        "psutil",  # megatron-core needs it but does not declare it
        "numpy<3",
        "pyyaml>=6",
        "sentencepiece>=0.2,<0.3",
        "tokenizers>=0.19,<1",
        "tensorboard>=2.14",
        "tqdm>=4.60",
        "einops",
    ],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["llada-cpt=llada_cpt.cli:main"]},
)
