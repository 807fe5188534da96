"""Built-in metrics; each module registers one component."""
from metrics import harm_classifier  # noqa: F401
