"""Built-in defences, one module each. Nothing is imported here: ``harness.api.registry`` finds each
module's ``@DEFENCES.register(...)`` decorator in the source and imports a module when its defence
is first asked for by name."""
