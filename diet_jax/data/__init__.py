"""Data: synthetic stream, raw-format readers, the stage store and its loaders."""
