"""Built-in attacks; each module registers one component."""
