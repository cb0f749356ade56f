"""ebft_megatron: Energy-Based Fine-Tuning on megatron-core."""

__version__ = "0.1.0"
