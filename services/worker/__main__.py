from services.common.runner import serve
from services.worker.app import create_app
from services.worker.settings import WorkerSettings


def main() -> None:
    settings = WorkerSettings()
    app = create_app(settings)
    serve(app, settings, drainable=app.state.worker.drainer)  # SIGTERM drains, then exits


if __name__ == "__main__":
    main()
