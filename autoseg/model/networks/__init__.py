"""One module per network family; each registers itself with `autoseg.model.families.register`.

Adding a family is adding a module here (see docs/networks.md): the registry finds it by name.
"""
