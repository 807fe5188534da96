"""Built-in metrics; each module registers one component."""
from metrics import keyword_refusal  # noqa: F401
from metrics import harm_classifier  # noqa: F401
from metrics import detoxify_scorer  # noqa: F401
from metrics import perspective  # noqa: F401
from metrics import capability  # noqa: F401
from metrics import trainability  # noqa: F401
from metrics import profanity_check  # noqa: F401
