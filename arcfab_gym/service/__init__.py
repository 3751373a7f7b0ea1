"""``arcfab serve``: Arc Fabric sessions over world models as a web service.

    from arcfab_gym.service import ServiceSettings, create_app
    app = create_app(ServiceSettings(max_sessions=4))   # any ASGI server can run it

Needs the ``fastapi`` and ``uvicorn`` dependencies.
"""

from arcfab_gym.service.app import create_app
from arcfab_gym.service.settings import ServiceSettings

__all__ = ["ServiceSettings", "create_app"]
