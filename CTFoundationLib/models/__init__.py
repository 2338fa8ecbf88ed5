"""Model implementations (pure PyTorch, no slicer/qt): CT-CLIP v2 in `ctclip`."""
