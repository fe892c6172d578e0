"""Fusion's domain library: settings, prices and model shapes, defined once.

Shipped to every function as a Lambda layer and copied into the training image.
Nothing here creates an AWS client at import time.
"""
