"""``python -m services.lot``: serve until SIGINT / SIGTERM."""

from services.base import main
from services.lot.service import SERVICE

if __name__ == "__main__":
    raise SystemExit(main(SERVICE))
