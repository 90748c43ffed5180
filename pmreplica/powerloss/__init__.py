"""Power-loss simulation: PMDK's pmreorder for pmreplica.

A crash test that kills the process (SIGKILL) keeps the page cache, so every store survives
it and a missing or misplaced persist never shows. This package models what a power
failure keeps instead:

* model.py: while a workload runs, the durable image of the files under its directory is
  kept apart from the live one (a range becomes durable at its persist, at the drain after
  its flush, or at an fdatasync of its file); at durability points the words stored but not
  yet durable are recorded;
* stream.py: the record of a run, from which the durable image at any point is rebuilt;
* images.py: the crash images of a point: the durable image plus subsets of its pending
  8-byte words (all of them when few, else random ones drawn by write-back-like rules);
* check.py: each image is written out and handed to a freshly forked process that runs the
  scenario's ``verify``: it must recover to a state the workload allowed there;
* explore.py: one call runs the writer and the checkers.

A scenario is a class built from JSON parameters with three methods: ``setup(workdir)``
makes the starting files (durable), ``run(workdir, sim)`` runs the workload under the
simulation, setting ``sim.context`` to what a crash may leave at each moment, and
``verify(imagedir, context)`` opens an image (a copy of the directory; pool set files
rewritten to name it) and raises when it is not such a state, returning a short label of
what it found. tests/powerloss/scenarios.py holds pmreplica's own; ``python -m
pmreplica.powerloss`` runs the writer and checkers by hand, tools/powerloss_stress.py many
explorations.

The simulation is a test mode: the mapping layer hands new mappings to it only while it is
active (``pmem.set_observer``), so normal operation pays nothing for it.
"""

from .explore import Report, explore
from .model import Simulation

__all__ = ["Simulation", "explore", "Report"]
