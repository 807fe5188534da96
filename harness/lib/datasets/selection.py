"""How a dataset's rows are drawn for the roles of a trial (``harness.lib.data.draw``).

A loader whose ``Config`` extends ``SelectableConfig`` takes a ``selection`` parameter:

* ``seeded`` (default): one seeded permutation of the rows per dataset; the defence takes the
  first ``defence.samples`` rows of it, the attack the next ``attack.samples``, the evaluation the
  last ``eval.samples`` (disjoint regions).
* ``file``: the same disjoint regions, in file order instead of a permutation.
* ``reference``: the authors' draw: every role takes the first ``n`` rows of the file in file
  order (``Dataset.select(range(n))`` in the RepNoise code), so roles that read the same dataset
  overlap; only valid with ``disjoint: false``.
"""

from __future__ import annotations

from typing import Literal

from harness.api.components import ComponentConfig

Selection = Literal["seeded", "file", "reference"]
SELECTIONS = ("seeded", "file", "reference")


class SelectableConfig(ComponentConfig):
    """Loader parameters shared by the datasets whose draw can follow the authors' file order."""

    selection: Selection = "seeded"
