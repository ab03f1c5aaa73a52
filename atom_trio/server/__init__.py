"""The OpenAI-compatible HTTP server: a QuartTrio app over the trio engine, served by hypercorn."""

from __future__ import annotations

from ..config import ServerSettings as ServerSettings
from .errors import ApiError as ApiError
from .guest import TrioGuestHost as TrioGuestHost
from .routes import create_app as create_app
from .serve import Serving as Serving
from .serve import hypercorn_config as hypercorn_config
from .serve import serve as serve
from .state import ServerState as ServerState
