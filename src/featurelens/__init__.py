"""featurelens: what convolutional networks learn, measured while they train. ``featurelens.run(name, model,
...)`` runs a registered analysis as a library (see :mod:`featurelens.api`)."""


def __getattr__(name: str):
    if name in ("run", "analyses"):
        from featurelens import api

        return getattr(api, name)
    raise AttributeError(f"module 'featurelens' has no attribute {name!r}")
