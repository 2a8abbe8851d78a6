"""The one way this project gets matplotlib: pyplot on the headless Agg backend, so plots are
written as PNG files on machines without a display (CI, servers)."""


def pyplot():
    """``matplotlib.pyplot`` with the Agg backend selected (imported lazily: plotting is optional)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


__all__ = ["pyplot"]
