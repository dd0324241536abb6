"""`python -m services.coordinator`: settings from COORDINATOR_* environment variables."""

from fastapi import FastAPI

from services.common.memory import fix_mmap_threshold
from services.common.runner import serve
from services.coordinator.app import create_app
from services.coordinator.settings import CoordinatorSettings


def main() -> None:
    fix_mmap_threshold()  # the ring's arrays, freed by every merge, leave RSS
    settings = CoordinatorSettings()
    app = create_app(settings)
    serve(app, settings, on_shutdown=lambda: answer_long_polls(app))


def answer_long_polls(app: FastAPI) -> None:
    """Routers' long polls on /ring answer at once when the coordinator stops, not after wait_s."""
    watch = getattr(app.state, "watch", None)  # None if the app never started
    if watch is not None:
        watch.close()


if __name__ == "__main__":
    main()
