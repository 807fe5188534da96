"""Built-in metrics (text scorers and evaluations), one module each. Nothing is imported here:
``harness.api.registry`` finds each module's ``@METRICS.register(...)`` decorator in the source and
imports a module when its metric is first asked for by name."""
