"""Built-in attacks, one module each. Nothing is imported here: ``harness.api.registry`` finds each
module's ``@ATTACKS.register(...)`` decorator in the source and imports a module when its attack is
first asked for by name."""
