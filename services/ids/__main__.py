"""``python -m services.ids``: serve until SIGINT / SIGTERM."""

from services.base import main
from services.ids.service import SERVICE

if __name__ == "__main__":
    raise SystemExit(main(SERVICE))
