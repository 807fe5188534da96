"""An example defence shipped by another package and found through the ``harness.defences`` entry point."""
