import sys

from services.common.runner import serve
from services.worker.app import create_app
from services.worker.settings import WorkerSettings

# A request passes the GIL between the worker's threads several times (the event loop, the
# executor's threads for tokenizing and the session store, the engine's thread); a thread that
# asks for it waits up to this interval (Python's default: 5 ms) before the holder is made to let
# go. Seen as 5 ms futex timeouts in a trace of one tiny request (README, "Routing tax").
GIL_SWITCH_INTERVAL_S = 0.001


def main() -> None:
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    settings = WorkerSettings()
    app = create_app(settings)
    serve(app, settings, drainable=app.state.worker.drainer)  # SIGTERM drains, then exits


if __name__ == "__main__":
    main()
