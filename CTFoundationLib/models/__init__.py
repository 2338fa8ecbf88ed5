"""Model implementations (pure PyTorch, no slicer/qt): one file per model, each with its checkpoint loader."""
