"""``matrixoe``: the Matrix OE console from a shell, over its REST API (``/api/v1/``)."""
