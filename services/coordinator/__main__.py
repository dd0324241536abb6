"""`python -m services.coordinator`: settings from COORDINATOR_* environment variables."""

from services.common.runner import serve
from services.coordinator.app import create_app
from services.coordinator.settings import CoordinatorSettings


def main() -> None:
    settings = CoordinatorSettings()
    serve(create_app(settings), settings)


if __name__ == "__main__":
    main()
