from pathlib import Path

from setuptools import find_packages, setup


def requirements():
    lines = Path(__file__).with_name("requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


setup(
    name="ebft_megatron",
    version="0.1.0",
    description="Energy-Based Fine-Tuning (EBFT) on megatron-core: strided block-parallel rollouts, "
    "feature matching, TP/PP/DP",
    python_requires=">=3.10",
    packages=find_packages(include=["ebft_megatron", "ebft_megatron.*"]),
    install_requires=requirements(),
    extras_require={
        # Transformer Engine for FP8/bf16 kernels on Hopper; needs a CUDA build of torch.
        "gpu": ["transformer-engine[pytorch]"],
        "test": ["pytest", "hypothesis==6.170.17"],
    },
    entry_points={
        "console_scripts": [
            "ebft-generate=ebft_megatron.generate:main",
        ]
    },
)
