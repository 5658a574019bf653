"""nn.Modules that own weights: attention layers and rotary embeddings."""
