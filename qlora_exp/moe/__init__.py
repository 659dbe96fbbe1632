"""QLoRA for mixture-of-experts models whose experts transformers 5 stores as fused 3-D weights.

experts.py: the experts' frozen weights in 4 bits and their grouped forward/backward;
loading.py: finding, refusing or converting the experts while the model loads (with the router
loss switch); lora.py: LoRA target presets, LoRA on the fused experts, counts per kind, adapters.
model.py calls `fused_experts_loading`, `router_loss_kwargs`, `target_lora` and
`count_trainable_by_kind`; finished runs load adapters through `load_adapter`.
"""
