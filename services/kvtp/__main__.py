"""``python -m services.kvtp``: serve until SIGINT / SIGTERM."""

from services.base import main
from services.kvtp.service import SERVICE

if __name__ == "__main__":
    raise SystemExit(main(SERVICE))
