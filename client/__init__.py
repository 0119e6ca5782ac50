"""imgsvc for integrators: an HTTP client (``client.http``) and the ``imgsvc`` command (``client.cli``).

It needs only ``requests`` and ``tqdm`` and imports nothing from the service, so it can ship alone.
"""
from client.http import ApiClient, ApiError

__all__ = ["ApiClient", "ApiError"]
