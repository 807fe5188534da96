"""Built-in defences; each module registers one component."""
from defences import none  # noqa: F401
from defences import repnoise  # noqa: F401
