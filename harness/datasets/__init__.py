"""Built-in dataset loaders; each module registers one dataset."""
