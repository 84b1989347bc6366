"""``python -m services.view``: serve the live view until SIGINT / SIGTERM."""

from services.base import main
from services.view.service import ViewService

if __name__ == "__main__":
    raise SystemExit(main(ViewService()))
