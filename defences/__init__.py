"""Built-in defences; each module registers one component."""
from defences import none  # noqa: F401
