"""What the handlers of one app share: its configs, the engine once it runs, metrics and the drain flag."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import attrs
from quart import current_app

from ..config import EngineConfig, ServerSettings
from .errors import ApiError, engine_unavailable
from .generation import Activity
from .metrics import ServerMetrics
from .profiler import Profiler

if TYPE_CHECKING:
    from ..engine import AsyncEngine


@attrs.define(eq=False)
class ServerState:
    """One app's state; `create_app` puts it in ``app.extensions["atom_trio"]``."""

    config: EngineConfig
    settings: ServerSettings
    engine: AsyncEngine | None = None
    engine_error: BaseException | None = None
    draining: bool = False
    activity: Activity = attrs.Factory(Activity)
    metrics: ServerMetrics = attrs.field(init=False)
    profiler: Profiler = attrs.field(init=False)
    created: int = attrs.Factory(lambda: int(time.time()))

    def __attrs_post_init__(self) -> None:
        self.metrics = ServerMetrics(lambda: self.engine, self.model_name)
        self.profiler = Profiler(self.settings)

    @property
    def model_name(self) -> str:
        return self.config.model_name

    def healthy(self) -> bool:
        return self.engine is not None and self.engine.is_healthy() and not self.draining

    def require_engine(self) -> AsyncEngine:
        """The engine, if it can take a request now; otherwise the 503 to answer."""
        if self.draining:
            raise engine_unavailable("The server is shutting down.")
        if self.engine is None:
            raise engine_unavailable("The engine is not running." if self.engine_error is None
                                     else f"The engine failed: {self.engine_error}")
        if not self.engine.is_healthy():
            raise engine_unavailable("The engine has stopped.")
        return self.engine

    def unavailable(self) -> ApiError:
        """The 503 that `require_engine` would raise now (``/health`` answers it while unhealthy)."""
        try:
            self.require_engine()
        except ApiError as error:
            return error
        return engine_unavailable()


def current_state() -> ServerState:
    """The state of the app serving the current request."""
    return current_app.extensions["atom_trio"]
