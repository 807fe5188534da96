"""Built-in metrics; each module registers one component."""
