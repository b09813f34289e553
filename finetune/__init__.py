"""finetune: fine-tune pretrained language models with Accelerate and measure what they forgot."""

__version__ = "0.1.0"
