"""Applications of the pretrained models (chapters 21-25): classification and
fine-tuning, LoRA, dialogue, extractive question answering (``qa``, chapter 23), beam
search, metrics, and model compression."""
