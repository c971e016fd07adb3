"""Ops: one module per op, each with a documented slot policy; see ``registry.OPS``."""
