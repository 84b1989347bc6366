"""``python -m services.scch``: serve until SIGINT / SIGTERM."""

from services.base import main
from services.scch.service import SERVICE

if __name__ == "__main__":
    raise SystemExit(main(SERVICE))
