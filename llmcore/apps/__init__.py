"""Applications of the pretrained models (chapters 22-25): classification
fine-tuning and LoRA."""
