"""inspect: look at checkpoints without changing them -- compare two (:mod:`~surgeon.inspect.diff`,
its results in :mod:`~surgeon.inspect.result`), follow a run of them
(:mod:`~surgeon.inspect.series`), check one's health (:mod:`~surgeon.inspect.audit`), all over
the chunked float64 arithmetic of :mod:`~surgeon.inspect.stream`; and render what they find
as text, markdown, JSON-ready dicts or PNG plots (:mod:`~surgeon.inspect.report`,
:mod:`~surgeon.inspect.render` for ``ls``). Never prints, never writes a checkpoint. May import
core, binding, formats and ops (to read recipe masks); not recipe, convert, train or cli.
"""
