"""Applications of the pretrained models (chapters 21-25): classification and
fine-tuning, LoRA, dialogue, beam search, metrics, and model compression."""
