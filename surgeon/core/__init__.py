"""core: what every other package stands on -- the canonical tree of a checkpoint
(:mod:`~surgeon.core.tree`: ``Entry``, ``OptimizerInfo``, roles and slot names), the
``SurgeonError`` hierarchy (:mod:`~surgeon.core.errors`) and atomic writing beside the target
(:mod:`~surgeon.core.atomic`), crash-safe in-place edits through a rollback journal
(:mod:`~surgeon.core.journal`) and fast whole-file I/O (:mod:`~surgeon.core.fastio`). Plain
Python and numpy only; imports nothing else from surgeon.
"""
__version__ = "0.1.0"
