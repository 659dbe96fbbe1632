"""qlora-exp's Hydra launcher plugin: hydra/launcher=gpu_share (qlora_exp/run/gpu_share.py)."""
