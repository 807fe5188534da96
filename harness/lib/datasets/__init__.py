"""Built-in dataset loaders, one module each. Nothing is imported here: ``harness.api.registry``
finds each module's ``@DATASETS.register(...)`` decorator in the source and imports a module when
its dataset is first asked for by name."""
