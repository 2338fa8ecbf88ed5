"""Model ports: our own PyTorch implementations of the reference models, with checkpoint loaders."""
