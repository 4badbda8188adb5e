"""Writers of tiny random checkpoints in the real file layouts (key names, dtypes, prefixes, folders).

One module per component. Nothing they write is committed: tests write into temporary folders.
"""
