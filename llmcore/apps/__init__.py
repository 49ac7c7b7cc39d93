"""Applications of the pretrained models (chapters 22-25): classification and
fine-tuning, LoRA, dialogue, beam search."""
