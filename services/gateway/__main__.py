from services.common.memory import fix_mmap_threshold
from services.common.runner import serve
from services.gateway.app import create_app
from services.gateway.settings import GatewaySettings


def main() -> None:
    fix_mmap_threshold()  # the ring's arrays, freed by every merge, leave RSS
    settings = GatewaySettings()
    serve(create_app(settings), settings)


if __name__ == "__main__":
    main()
