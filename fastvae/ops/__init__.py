"""The fused ops, one folder per family (see `fastvae.ops.registry` for the table).

Nothing is imported here, so that fastvae.backend can import `fastvae.ops.library`
(the native library loader) without pulling in the families that depend on it.
"""
