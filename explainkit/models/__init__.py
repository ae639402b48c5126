"""Where a model comes from and how to read it: cards, sources (torchvision, timm, Hugging Face,
user callables), the local store, layers and their layouts, outputs, and model hygiene."""
