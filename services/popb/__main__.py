"""``python -m services.popb``: serve until SIGINT / SIGTERM."""

from services.base import main
from services.popb.service import SERVICE

if __name__ == "__main__":
    raise SystemExit(main(SERVICE))
