"""``python -m services.decode``: serve the decode worker until SIGINT / SIGTERM."""

from services.base import main
from services.decode.worker import DecodeService

if __name__ == "__main__":
    raise SystemExit(main(DecodeService()))
