from services.common.runner import serve
from services.worker.app import create_app
from services.worker.settings import WorkerSettings


def main() -> None:
    settings = WorkerSettings()
    serve(create_app(settings), settings)


if __name__ == "__main__":
    main()
