"""core: what every other package stands on -- the canonical tree of a checkpoint
(:mod:`~surgeon.core.tree`: ``Entry``, ``OptimizerInfo``, roles and slot names), the
``SurgeonError`` hierarchy (:mod:`~surgeon.core.errors`) and atomic writing beside the target
(:mod:`~surgeon.core.atomic`). Plain Python and numpy only; imports nothing else from surgeon.
"""
__version__ = "0.1.0"
