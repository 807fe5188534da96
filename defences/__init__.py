"""Built-in defences; each module registers one component."""
