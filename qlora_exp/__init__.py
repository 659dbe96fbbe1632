"""qlora-exp: Hydra-driven QLoRA instruction fine-tuning experiments."""

__version__ = "0.1.0"
