"""Building images: a source in, an image in staging and what to record about it out.

The builder sits below the Store and knows nothing of the journal: it asks
the few questions it has through :class:`Known`, which the Store answers.
A source (:mod:`.sources`) says which strategies can build it; the
strategies (:mod:`.strategies`) are tried cheapest first, and the first that
succeeds gives the :class:`~.outcome.Outcome` the Store records.
"""

from .options import CreateOptions
from .outcome import Delta, Known, Outcome, SameAs
from .sources import DirectorySource, DumpSource, LayeredSource, Source, TreeSource, source_for
from .strategies import Builder

__all__ = ["Builder", "CreateOptions", "Delta", "DirectorySource", "DumpSource", "Known", "LayeredSource", "Outcome",
           "SameAs", "Source", "TreeSource", "source_for"]
