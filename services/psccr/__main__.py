"""``python -m services.psccr``: serve until SIGINT / SIGTERM."""

from services.base import main
from services.psccr.service import SERVICE

if __name__ == "__main__":
    raise SystemExit(main(SERVICE))
