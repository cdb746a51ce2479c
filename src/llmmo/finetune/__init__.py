"""Adapting a pretrained checkpoint to a task: LoRA adapters (lora)."""
